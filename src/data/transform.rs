//! Image transforms: decode, random resized crop + flip (train), resize + centre crop (test).
//!
//! Resampling is bilinear in the style of PIL (which torchvision uses on PIL images): when
//! shrinking, the triangle filter is widened by the scale factor, so downsampling averages all the
//! covered pixels instead of aliasing. Output is f32, CHW, RGB, in [0, 1]; mean/std normalisation
//! belongs to the model.

use std::path::Path;

use super::{DataError, DataResult, ImageSource, MemImage};
use crate::engine::Rng;

/// An 8-bit RGB image, row-major, interleaved.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Expands gray to three channels.
    pub fn from_mem(img: &MemImage) -> RgbImage {
        let pixels = if img.channels == 3 {
            img.pixels.as_ref().clone()
        } else {
            img.pixels.iter().flat_map(|&g| [g, g, g]).collect()
        };
        RgbImage {
            width: img.width,
            height: img.height,
            pixels,
        }
    }
}

/// Decodes a JPEG or PNG file to RGB (gray, gray+alpha and RGBA are converted).
pub fn decode_file(path: &Path) -> DataResult<RgbImage> {
    let corrupt = |detail: String| DataError::CorruptImage {
        path: path.to_path_buf(),
        detail,
    };
    let reader = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?;
    let img = reader
        .decode()
        .map_err(|e| match e {
            image::ImageError::Limits(l) => DataError::ImageTooLarge {
                path: path.to_path_buf(),
                detail: l.to_string(),
            },
            e => corrupt(e.to_string()),
        })?
        .into_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(corrupt("image has zero size".into()));
    }
    Ok(RgbImage {
        width: w as usize,
        height: h as usize,
        pixels: img.into_raw(),
    })
}

/// Decodes a sample's source to RGB.
pub fn decode(source: &ImageSource) -> DataResult<RgbImage> {
    match source {
        ImageSource::File(path) => decode_file(path),
        ImageSource::Memory(img) => Ok(RgbImage::from_mem(img)),
    }
}

/// Which transform to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Augment {
    /// RandomResizedCrop(size, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip (p = 0.5).
    Train,
    /// Resize the shorter side to size * 256 / 224, then centre-crop size x size.
    Test,
    /// Resize the whole image to size x size (no crop, no randomness): for small in-memory images.
    Resize,
    /// The whole image resized, then a horizontal flip (p = 0.5): training augmentation for small
    /// in-memory images, where a crop down to 8% of 28x28 pixels would leave nothing to learn.
    Flip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageTransform {
    /// Output width and height.
    pub size: usize,
    pub augment: Augment,
}

/// A crop box in source pixels (may be fractional for the test transform's resize-then-crop).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropBox {
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
}

impl ImageTransform {
    pub fn train(size: usize) -> Self {
        ImageTransform {
            size,
            augment: Augment::Train,
        }
    }

    pub fn test(size: usize) -> Self {
        ImageTransform {
            size,
            augment: Augment::Test,
        }
    }

    /// Number of f32 values one output image takes (3 * size * size).
    pub fn output_len(&self) -> usize {
        3 * self.size * self.size
    }

    /// Transforms `img` into `out` (CHW, length [`Self::output_len`]). `rng` drives the train
    /// augmentation; the other modes do not touch it.
    pub fn apply(&self, img: &RgbImage, rng: &mut Rng, out: &mut [f32]) {
        let s = self.size;
        let (crop, flip) = match self.augment {
            Augment::Train => {
                let crop = random_resized_crop_box(img.width, img.height, rng);
                (crop, rng.uniform() < 0.5)
            }
            Augment::Test => (centre_crop_box(img.width, img.height, s), false),
            Augment::Resize | Augment::Flip => {
                let whole = CropBox {
                    x: 0.0,
                    y: 0.0,
                    width: img.width as f64,
                    height: img.height as f64,
                };
                (whole, self.augment == Augment::Flip && rng.uniform() < 0.5)
            }
        };
        resample(img, crop, s, s, out);
        if flip {
            flip_horizontal(out, s, s);
        }
    }
}

/// torchvision's `RandomResizedCrop.get_params` with scale (0.08, 1) and ratio (3/4, 4/3): ten
/// tries at a random area and log-uniform aspect ratio, then a centred crop clamped to the ratio.
pub fn random_resized_crop_box(width: usize, height: usize, rng: &mut Rng) -> CropBox {
    let (w_in, h_in) = (width as f64, height as f64);
    let area = w_in * h_in;
    let (ratio_lo, ratio_hi) = (3.0f64 / 4.0, 4.0f64 / 3.0);
    let (log_lo, log_hi) = (ratio_lo.ln(), ratio_hi.ln());
    for _ in 0..10 {
        let target_area = area * rng.uniform_range(0.08, 1.0) as f64;
        let aspect = (log_lo + (log_hi - log_lo) * rng.uniform() as f64).exp();
        let w = (target_area * aspect).sqrt().round() as usize;
        let h = (target_area / aspect).sqrt().round() as usize;
        if w > 0 && h > 0 && w <= width && h <= height {
            let top = rng.below(height - h + 1);
            let left = rng.below(width - w + 1);
            return CropBox {
                x: left as f64,
                y: top as f64,
                width: w as f64,
                height: h as f64,
            };
        }
    }
    let in_ratio = w_in / h_in;
    let (w, h) = if in_ratio < ratio_lo {
        (width, (w_in / ratio_lo).round() as usize)
    } else if in_ratio > ratio_hi {
        ((h_in * ratio_hi).round() as usize, height)
    } else {
        (width, height)
    };
    CropBox {
        x: ((width - w) / 2) as f64,
        y: ((height - h) / 2) as f64,
        width: w as f64,
        height: h as f64,
    }
}

/// The test transform as one box: resizing the shorter side to `size * 256 / 224` and then
/// centre-cropping `size` equals resampling this box of the source straight to `size x size`.
pub fn centre_crop_box(width: usize, height: usize, size: usize) -> CropBox {
    let short_target = (size as f64 * 256.0 / 224.0).round() as usize;
    // torchvision: the shorter side becomes short_target, the longer one is truncated.
    let (new_w, new_h) = if width <= height {
        (short_target, short_target * height / width)
    } else {
        (short_target * width / height, short_target)
    };
    let scale_x = width as f64 / new_w as f64;
    let scale_y = height as f64 / new_h as f64;
    let left = ((new_w as f64 - size as f64) / 2.0)
        .round_ties_even()
        .max(0.0);
    let top = ((new_h as f64 - size as f64) / 2.0)
        .round_ties_even()
        .max(0.0);
    CropBox {
        x: left * scale_x,
        y: top * scale_y,
        width: size as f64 * scale_x,
        height: size as f64 * scale_y,
    }
}

/// For one axis: for every output position, the first input index and the filter weights.
fn axis_weights(in_size: usize, start: f64, len: f64, out_size: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = len / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // the bilinear (triangle) filter has radius 1
    (0..out_size)
        .map(|i| {
            let centre = start + (i as f64 + 0.5) * scale;
            let lo = ((centre - support + 0.5).floor().max(0.0) as usize).min(in_size - 1);
            let hi = ((centre + support + 0.5).floor() as usize).clamp(lo + 1, in_size);
            let mut w: Vec<f64> = (lo..hi)
                .map(|x| (1.0 - ((x as f64 - centre + 0.5) / filter_scale).abs()).max(0.0))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum > 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            } else {
                // The box lies outside the image (cannot happen for valid boxes): nearest pixel.
                w.iter_mut().for_each(|v| *v = 0.0);
                w[0] = 1.0;
            }
            (lo, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// Resamples `crop` of `img` to `out_w x out_h`, writing CHW f32 in [0, 1] into `out`.
pub fn resample(img: &RgbImage, crop: CropBox, out_w: usize, out_h: usize, out: &mut [f32]) {
    let xs = axis_weights(img.width, crop.x, crop.width, out_w);
    let ys = axis_weights(img.height, crop.y, crop.height, out_h);
    let row_lo = ys.iter().map(|(lo, _)| *lo).min().unwrap_or(0);
    let row_hi = ys.iter().map(|(lo, w)| lo + w.len()).max().unwrap_or(0);
    // Horizontal pass over the rows the vertical pass needs: [row][out_x][channel].
    let mut rows = vec![0f32; (row_hi - row_lo) * out_w * 3];
    for y in row_lo..row_hi {
        let src = &img.pixels[y * img.width * 3..(y + 1) * img.width * 3];
        let dst = &mut rows[(y - row_lo) * out_w * 3..(y - row_lo + 1) * out_w * 3];
        for (ox, (lo, w)) in xs.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, &wk) in w.iter().enumerate() {
                let p = &src[(lo + k) * 3..(lo + k) * 3 + 3];
                for c in 0..3 {
                    acc[c] += wk * p[c] as f32;
                }
            }
            dst[ox * 3..ox * 3 + 3].copy_from_slice(&acc);
        }
    }
    // Vertical pass straight into CHW.
    let plane = out_w * out_h;
    for (oy, (lo, w)) in ys.iter().enumerate() {
        for ox in 0..out_w {
            let mut acc = [0f32; 3];
            for (k, &wk) in w.iter().enumerate() {
                let r = (lo + k - row_lo) * out_w * 3 + ox * 3;
                for c in 0..3 {
                    acc[c] += wk * rows[r + c];
                }
            }
            for c in 0..3 {
                out[c * plane + oy * out_w + ox] = (acc[c] / 255.0).clamp(0.0, 1.0);
            }
        }
    }
}

/// Mirrors a CHW image left-right in place.
pub fn flip_horizontal(chw: &mut [f32], width: usize, height: usize) {
    for row in chw.chunks_exact_mut(width).take(3 * height) {
        row.reverse();
    }
}
