//! A built-in procedural dataset for tests, demos and smoke runs without downloads.
//!
//! A class is a (shape, colour, texture) triple drawn from 8 shapes x 6 colours x 3 textures by a
//! fixed permutation, so many classes share a shape and differ only in colour or texture. Each
//! image varies the position, scale, rotation and colour of the object, and adds a gradient
//! background, distractor shapes (sometimes occluding the object) and pixel noise: a small CNN can
//! learn the classes well, raw pixels cannot, and nothing reaches 100% Recall@1. Everything is a
//! pure function of the seed.

use std::f32::consts::PI;

use super::{DataError, DataResult, Dataset, ImageSource, MemImage, Sample};
use crate::engine::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticConfig {
    /// Number of classes (at least 2, at most 144); the first half train, the second half test.
    pub num_classes: usize,
    pub train_per_class: usize,
    pub test_per_class: usize,
    /// Width and height in pixels.
    pub image_size: usize,
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            num_classes: 40,
            train_per_class: 60,
            test_per_class: 60,
            image_size: 32,
            seed: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Disc,
    Square,
    Triangle,
    Cross,
    Ring,
    Diamond,
    Star,
    Bars,
}

const SHAPES: [Shape; 8] = [
    Shape::Disc,
    Shape::Square,
    Shape::Triangle,
    Shape::Cross,
    Shape::Ring,
    Shape::Diamond,
    Shape::Star,
    Shape::Bars,
];

const COLOUR_NAMES: [&str; 6] = ["red", "orange", "yellow", "green", "blue", "purple"];

const PALETTE: [[f32; 3]; 6] = [
    [0.85, 0.20, 0.20], // red
    [0.95, 0.60, 0.15], // orange
    [0.90, 0.85, 0.20], // yellow
    [0.25, 0.70, 0.30], // green
    [0.20, 0.40, 0.85], // blue
    [0.60, 0.30, 0.75], // purple
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Texture {
    Solid,
    Stripes,
    Dots,
}

const TEXTURES: [Texture; 3] = [Texture::Solid, Texture::Stripes, Texture::Dots];

/// Number of distinct (shape, colour, texture) classes.
pub const MAX_CLASSES: usize = SHAPES.len() * PALETTE.len() * TEXTURES.len();

#[derive(Clone, Copy, Debug)]
struct ClassDef {
    shape: Shape,
    colour: [f32; 3],
    colour_name: &'static str,
    texture: Texture,
}

/// The class table: a fixed permutation of all triples, independent of the data seed so that
/// class `c` always means the same thing.
fn class_table() -> Vec<ClassDef> {
    let mut combos: Vec<usize> = (0..MAX_CLASSES).collect();
    Rng::new(0x05EE_DC1A_55E5).shuffle(&mut combos);
    combos
        .into_iter()
        .map(|k| ClassDef {
            shape: SHAPES[k % SHAPES.len()],
            colour: PALETTE[(k / SHAPES.len()) % PALETTE.len()],
            colour_name: COLOUR_NAMES[(k / SHAPES.len()) % PALETTE.len()],
            texture: TEXTURES[k / (SHAPES.len() * PALETTE.len())],
        })
        .collect()
}

/// Is the point (u, v), in the shape's own unit coordinates, inside the shape?
fn inside(shape: Shape, u: f32, v: f32) -> bool {
    let r = (u * u + v * v).sqrt();
    match shape {
        Shape::Disc => r <= 1.0,
        Shape::Square => u.abs().max(v.abs()) <= 0.82,
        Shape::Triangle => {
            // Equilateral triangle with circumradius 1, apex up.
            // Vertices (0, 1) and (+-sqrt(3)/2, -1/2).
            v >= -0.5 && v <= 1.0 - 3f32.sqrt() * u.abs()
        }
        Shape::Cross => (u.abs() <= 0.3 && v.abs() <= 0.95) || (v.abs() <= 0.3 && u.abs() <= 0.95),
        Shape::Ring => (0.55..=1.0).contains(&r),
        Shape::Diamond => u.abs() + v.abs() <= 1.0,
        Shape::Star => {
            let theta = v.atan2(u);
            r <= 0.45 + 0.55 * (0.5 + 0.5 * (5.0 * theta).cos()).powi(2)
        }
        Shape::Bars => u.abs() <= 0.95 && (v.abs() - 0.5).abs() <= 0.22,
    }
}

/// The object's colour at local coordinates (u, v).
fn texture_colour(texture: Texture, base: [f32; 3], u: f32, v: f32) -> [f32; 3] {
    let dark = [base[0] * 0.4, base[1] * 0.4, base[2] * 0.4];
    let light = [
        base[0] * 0.5 + 0.5,
        base[1] * 0.5 + 0.5,
        base[2] * 0.5 + 0.5,
    ];
    match texture {
        Texture::Solid => base,
        Texture::Stripes => {
            if (u * 2.0 * PI * 1.4).sin() > 0.0 {
                base
            } else {
                dark
            }
        }
        Texture::Dots => {
            let fu = (u * 2.2 + 10.0).fract() - 0.5;
            let fv = (v * 2.2 + 10.0).fract() - 0.5;
            if fu * fu + fv * fv < 0.08 {
                light
            } else {
                base
            }
        }
    }
}

/// One object to draw: shape, texture, base colour, centre and radius in pixels, rotation.
struct Object {
    shape: Shape,
    texture: Texture,
    colour: [f32; 3],
    cx: f32,
    cy: f32,
    radius: f32,
    angle: f32,
}

/// Blends an object into an HWC f32 canvas with 2x2 supersampled coverage (anti-aliasing).
fn draw(canvas: &mut [f32], size: usize, obj: &Object) {
    let (sin, cos) = obj.angle.sin_cos();
    let to_local = |x: f32, y: f32| {
        let (dx, dy) = ((x - obj.cx) / obj.radius, (y - obj.cy) / obj.radius);
        (cos * dx + sin * dy, -sin * dx + cos * dy)
    };
    let reach = obj.radius * 1.5;
    let x0 = ((obj.cx - reach).floor().max(0.0)) as usize;
    let x1 = ((obj.cx + reach).ceil().min(size as f32)) as usize;
    let y0 = ((obj.cy - reach).floor().max(0.0)) as usize;
    let y1 = ((obj.cy + reach).ceil().min(size as f32)) as usize;
    for y in y0..y1 {
        for x in x0..x1 {
            let mut covered = 0;
            for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                let (u, v) = to_local(x as f32 + ox, y as f32 + oy);
                covered += inside(obj.shape, u, v) as u32;
            }
            if covered == 0 {
                continue;
            }
            let alpha = covered as f32 / 4.0;
            let (u, v) = to_local(x as f32 + 0.5, y as f32 + 0.5);
            let col = texture_colour(obj.texture, obj.colour, u, v);
            let px = &mut canvas[(y * size + x) * 3..(y * size + x) * 3 + 3];
            for c in 0..3 {
                px[c] = px[c] * (1.0 - alpha) + col[c] * alpha;
            }
        }
    }
}

fn random_colour(rng: &mut Rng) -> [f32; 3] {
    [rng.uniform(), rng.uniform(), rng.uniform()]
}

/// A small distractor object of random shape and colour.
fn distractor(rng: &mut Rng, size: f32) -> Object {
    Object {
        shape: SHAPES[rng.below(SHAPES.len())],
        texture: Texture::Solid,
        colour: random_colour(rng),
        cx: rng.uniform_range(0.0, size),
        cy: rng.uniform_range(0.0, size),
        radius: size * rng.uniform_range(0.06, 0.14),
        angle: rng.uniform_range(0.0, 2.0 * PI),
    }
}

/// Renders one image of class `def` as 8-bit RGB.
fn render(def: &ClassDef, size: usize, rng: &mut Rng) -> Vec<u8> {
    let s = size as f32;
    let mut canvas = vec![0f32; size * size * 3];
    // Background: a linear gradient between two random colours along a random direction.
    let (a, b) = (random_colour(rng), random_colour(rng));
    let dir = rng.uniform_range(0.0, 2.0 * PI);
    let (dy, dx) = dir.sin_cos();
    for y in 0..size {
        for x in 0..size {
            let t = 0.5 + 0.5 * ((x as f32 / s - 0.5) * dx + (y as f32 / s - 0.5) * dy) * 1.4;
            let t = t.clamp(0.0, 1.0);
            for c in 0..3 {
                canvas[(y * size + x) * 3 + c] = a[c] * (1.0 - t) + b[c] * t;
            }
        }
    }
    for _ in 0..1 + rng.below(3) {
        draw(&mut canvas, size, &distractor(rng, s));
    }
    let brightness = rng.uniform_range(0.8, 1.15);
    let colour = std::array::from_fn(|c| {
        (def.colour[c] * brightness + rng.uniform_range(-0.1, 0.1)).clamp(0.0, 1.0)
    });
    let object = Object {
        shape: def.shape,
        texture: def.texture,
        colour,
        cx: s * (0.5 + rng.uniform_range(-0.15, 0.15)),
        cy: s * (0.5 + rng.uniform_range(-0.15, 0.15)),
        radius: s * rng.uniform_range(0.22, 0.36),
        angle: rng.uniform_range(0.0, 2.0 * PI),
    };
    draw(&mut canvas, size, &object);
    // Sometimes a distractor lands on top and hides part of the object.
    if rng.uniform() < 0.3 {
        let mut occluder = distractor(rng, s);
        occluder.cx = object.cx + rng.uniform_range(-0.5, 0.5) * object.radius * 2.0;
        occluder.cy = object.cy + rng.uniform_range(-0.5, 0.5) * object.radius * 2.0;
        draw(&mut canvas, size, &occluder);
    }
    canvas
        .iter()
        .map(|&p| ((p + 0.06 * rng.normal()).clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}

/// The per-image generator: a pure function of (seed, split, class, instance).
fn image_rng(seed: u64, split: u64, class: usize, instance: usize) -> Rng {
    Rng::new(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ split.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
            ^ (class as u64).wrapping_mul(0x1656_67B1_9E37_79F9)
            ^ (instance as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93),
    )
}

/// Generates the synthetic dataset: classes `0..n/2` train, `n/2..n` test.
pub fn load_synthetic(cfg: &SyntheticConfig) -> DataResult<Dataset> {
    if cfg.num_classes < 2 || cfg.num_classes > MAX_CLASSES {
        return Err(DataError::Invalid(format!(
            "synthetic dataset: num_classes {} must be in 2..={MAX_CLASSES}",
            cfg.num_classes
        )));
    }
    if cfg.image_size < 8 || cfg.train_per_class == 0 || cfg.test_per_class == 0 {
        return Err(DataError::Invalid(format!(
            "synthetic dataset: image_size {} must be >= 8 and images per class ({} train, {} \
             test) >= 1",
            cfg.image_size, cfg.train_per_class, cfg.test_per_class
        )));
    }
    let table = class_table();
    let half = cfg.num_classes / 2;
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (class, def) in table.iter().enumerate().take(cfg.num_classes) {
        let (out, split, per_class, label) = if class < half {
            (&mut train, 0, cfg.train_per_class, class)
        } else {
            (&mut test, 1, cfg.test_per_class, class - half)
        };
        for instance in 0..per_class {
            let mut rng = image_rng(cfg.seed, split, class, instance);
            let pixels = render(def, cfg.image_size, &mut rng);
            out.push(Sample {
                source: ImageSource::Memory(MemImage::new(
                    cfg.image_size,
                    cfg.image_size,
                    3,
                    pixels,
                )?),
                label,
            });
        }
    }
    let name = |c: usize| {
        let d = &table[c];
        format!("{:?}/{}/{:?}", d.shape, d.colour_name, d.texture).to_lowercase()
    };
    Ok(Dataset {
        name: "synthetic".into(),
        train,
        test,
        query_count: None,
        train_classes: (0..half).map(name).collect(),
        test_classes: (half..cfg.num_classes).map(name).collect(),
        skipped: Default::default(),
    })
}
