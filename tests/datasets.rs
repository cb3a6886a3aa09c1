//! Dataset loaders on generated directory trees (every layout, broken ones included), the MAT v5
//! and IDX readers, the synthetic dataset, the transforms and the batch loader.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use robust_dml::data::transform::{
    centre_crop_box, decode_file, flip_horizontal, random_resized_crop_box, RgbImage,
};
use robust_dml::data::{
    self, fashion_mnist, folders, lists, mat, synthetic, Augment, BatchLoader, DataError,
    DatasetKind, FashionSplit, ImageSource, ImageTransform, LoaderConfig, SyntheticConfig,
};
use robust_dml::engine::Rng;

// ---------------------------------------------------------------- helpers

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("robust-dml-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_image(path: &Path, w: u32, h: u32, seed: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([seed.wrapping_mul(37), (x * 20) as u8, (y * 20) as u8 ^ seed])
    });
    img.save(path).unwrap();
}

fn write_bytes(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn file_name(source: &ImageSource) -> String {
    match source {
        ImageSource::File(p) => p.file_name().unwrap().to_string_lossy().into_owned(),
        ImageSource::Memory(_) => "<memory>".into(),
    }
}

// ---------------------------------------------------------------- CUB200

fn make_cub(root: &Path) {
    for (class, n) in [
        ("001.Black_footed_Albatross", 2),
        ("002.Laysan_Albatross", 1),
        ("101.White_Pelican", 2),
        ("150.Sage_Thrasher", 1),
    ] {
        for i in 0..n {
            let ext = if i % 2 == 0 { "jpg" } else { "png" };
            write_image(
                &root.join(class).join(format!("img{i}.{ext}")),
                12,
                9,
                i as u8,
            );
        }
    }
    // A corrupt JPEG and a non-image file.
    write_bytes(
        &root.join("001.Black_footed_Albatross/broken.jpg"),
        b"this is not a jpeg",
    );
    write_bytes(&root.join("002.Laysan_Albatross/notes.txt"), b"ignored");
}

#[test]
fn cub200_both_layouts_split_by_class_id() {
    for nested in [true, false] {
        let tmp = TempDir::new("cub");
        let images = if nested {
            tmp.path().join("CUB_200_2011/images")
        } else {
            tmp.path().join("images")
        };
        make_cub(&images);
        let ds = folders::load_cub200(tmp.path()).unwrap();
        assert_eq!(
            ds.train_classes,
            vec!["001.Black_footed_Albatross", "002.Laysan_Albatross"]
        );
        assert_eq!(
            ds.test_classes,
            vec!["101.White_Pelican", "150.Sage_Thrasher"]
        );
        assert_eq!(ds.train.len(), 3);
        assert_eq!(ds.test.len(), 3);
        assert_eq!(
            ds.train.iter().map(|s| s.label).collect::<Vec<_>>(),
            vec![0, 0, 1]
        );
        assert_eq!(
            ds.test.iter().map(|s| s.label).collect::<Vec<_>>(),
            vec![0, 0, 1]
        );
        // The corrupt file is skipped, counted and named.
        assert_eq!(ds.skipped.count(), 1);
        assert!(ds.skipped.skipped[0].0.ends_with("broken.jpg"));
        assert!(ds.summary().contains("skipped 1"));
        ds.validate().unwrap();
    }
}

/// CUB's `images.txt`: an entry leading outside `images/` is refused with its line named (it was
/// dropped without a word); a listed file that is not there is warned about, and loading goes on.
#[test]
fn cub200_index_entries_outside_the_dataset_are_refused() {
    let tmp = TempDir::new("cub-index");
    let images = tmp.path().join("CUB_200_2011/images");
    make_cub(&images);
    let index = tmp.path().join("CUB_200_2011/images.txt");
    write_bytes(
        &index,
        b"1 001.Black_footed_Albatross/a.jpg\n2 002.Laysan_Albatross/gone.jpg\n",
    );
    folders::load_cub200(tmp.path()).expect("a listed but missing file is only warned about");
    write_bytes(
        &index,
        b"1 001.Black_footed_Albatross/a.jpg\n2 ../../etc/passwd\n",
    );
    let err = folders::load_cub200(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("images.txt") && err.contains("line 2"),
        "{err}"
    );
    assert!(
        err.contains("../../etc/passwd") && err.contains("outside"),
        "{err}"
    );
    write_bytes(&index, b"1 /etc/passwd\n");
    let err = folders::load_cub200(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("line 1") && err.contains("outside"), "{err}");
}

#[test]
fn cub200_missing_directory_is_named() {
    let tmp = TempDir::new("cub-missing");
    let err = folders::load_cub200(tmp.path()).unwrap_err();
    assert!(matches!(err, DataError::MissingDir { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("CUB_200_2011") && msg.contains(&tmp.path().display().to_string()));
    // Through the generic entry point, a missing --data-dir is an error too.
    assert!(data::load(&DatasetKind::Cub200, None).is_err());
}

// ---------------------------------------------------------------- CARS196 (MAT v5)

/// A tiny MAT v5 writer: just enough to produce cars_annos.mat-like files.
mod matw {
    pub fn element(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(kind.to_le_bytes());
        out.extend((data.len() as u32).to_le_bytes());
        out.extend(data);
        while out.len() % 8 != 0 {
            out.push(0);
        }
        out
    }

    /// The compact form for payloads of at most 4 bytes.
    pub fn small_element(kind: u32, data: &[u8]) -> Vec<u8> {
        assert!(data.len() <= 4);
        let mut out = Vec::new();
        out.extend((((data.len() as u32) << 16) | kind).to_le_bytes());
        let mut slot = [0u8; 4];
        slot[..data.len()].copy_from_slice(data);
        out.extend(slot);
        out
    }

    pub fn matrix(class: u8, dims: &[i32], name: &str, body: &[u8]) -> Vec<u8> {
        let mut content = element(6, &[class as u32, 0].map(u32::to_le_bytes).concat());
        content.extend(element(
            5,
            &dims
                .iter()
                .flat_map(|d| d.to_le_bytes())
                .collect::<Vec<_>>(),
        ));
        content.extend(element(1, name.as_bytes()));
        content.extend(body);
        element(14, &content)
    }

    pub fn string(s: &str) -> Vec<u8> {
        let units: Vec<u8> = s.encode_utf16().flat_map(u16::to_le_bytes).collect();
        matrix(4, &[1, s.len() as i32], "", &element(4, &units))
    }

    pub fn double(v: f64) -> Vec<u8> {
        matrix(6, &[1, 1], "", &element(9, &v.to_le_bytes()))
    }

    /// A double-class scalar stored as miUINT8, as MATLAB does to save space.
    pub fn double_as_u8(v: u8) -> Vec<u8> {
        matrix(6, &[1, 1], "", &small_element(2, &[v]))
    }

    pub fn structs(name: &str, fields: &[&str], elements: &[Vec<Vec<u8>>]) -> Vec<u8> {
        let width = 32usize;
        let mut body = small_element(5, &(width as i32).to_le_bytes());
        let mut names = Vec::new();
        for f in fields {
            let mut b = f.as_bytes().to_vec();
            b.resize(width, 0);
            names.extend(b);
        }
        body.extend(element(1, &names));
        for e in elements {
            for v in e {
                body.extend(v);
            }
        }
        matrix(2, &[1, elements.len() as i32], name, &body)
    }

    pub fn cell(name: &str, items: &[Vec<u8>]) -> Vec<u8> {
        matrix(1, &[1, items.len() as i32], name, &items.concat())
    }

    pub fn compressed(var: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(var).unwrap();
        let z = enc.finish().unwrap();
        let mut out = Vec::new();
        out.extend(15u32.to_le_bytes());
        out.extend((z.len() as u32).to_le_bytes());
        out.extend(z); // compressed elements are not padded
        out
    }

    pub fn file(vars: &[Vec<u8>]) -> Vec<u8> {
        let mut header = b"MATLAB 5.0 MAT-file, written by robust-dml tests".to_vec();
        header.resize(116, b' ');
        header.extend([0u8; 8]);
        header.extend(0x0100u16.to_le_bytes());
        header.extend(b"IM");
        header.extend(vars.concat());
        header
    }
}

/// cars_annos.mat with the given (relative path, class) rows; `compress` wraps the annotations.
fn cars_mat(rows: &[(&str, u8)], compress: bool) -> Vec<u8> {
    let fields = ["relative_im_path", "bbox_x1", "class", "test"];
    let elements: Vec<Vec<Vec<u8>>> = rows
        .iter()
        .enumerate()
        .map(|(i, (path, class))| {
            let class_value = if i % 2 == 0 {
                matw::double_as_u8(*class)
            } else {
                matw::double(*class as f64)
            };
            vec![
                matw::string(path),
                matw::double(3.0),
                class_value,
                matw::double_as_u8(0),
            ]
        })
        .collect();
    let annotations = matw::structs("annotations", &fields, &elements);
    let names: Vec<Vec<u8>> = (1..=196)
        .map(|c| matw::string(&format!("Model {c}")))
        .collect();
    let class_names = matw::cell("class_names", &names);
    if compress {
        matw::file(&[
            matw::compressed(&annotations),
            matw::compressed(&class_names),
        ])
    } else {
        matw::file(&[annotations, class_names])
    }
}

#[test]
fn cars196_mat_layout_plain_and_compressed() {
    let rows = [
        ("car_ims/000001.jpg", 1u8),
        ("car_ims/000002.jpg", 2),
        ("car_ims/000003.jpg", 99),
        ("car_ims/000004.jpg", 196),
        ("car_ims/000005.jpg", 1),
        ("car_ims/000006.jpg", 98),
    ];
    for compress in [false, true] {
        let tmp = TempDir::new("cars");
        for (i, (p, _)) in rows.iter().enumerate() {
            write_image(&tmp.path().join(p), 10, 8, i as u8);
        }
        write_bytes(
            &tmp.path().join("cars_annos.mat"),
            &cars_mat(&rows, compress),
        );

        let parsed = mat::read_cars_annotations(&tmp.path().join("cars_annos.mat")).unwrap();
        assert_eq!(parsed[2], ("car_ims/000003.jpg".to_string(), 99));
        assert_eq!(parsed.len(), rows.len());

        let ds = folders::load_cars196(tmp.path()).unwrap();
        assert_eq!(ds.train_classes, vec!["Model 1", "Model 2", "Model 98"]);
        assert_eq!(ds.test_classes, vec!["Model 99", "Model 196"]);
        let train: Vec<(String, usize)> = ds
            .train
            .iter()
            .map(|s| (file_name(&s.source), s.label))
            .collect();
        assert_eq!(
            train,
            vec![
                ("000001.jpg".into(), 0),
                ("000005.jpg".into(), 0),
                ("000002.jpg".into(), 1),
                ("000006.jpg".into(), 2)
            ]
        );
        assert_eq!(ds.test.len(), 2);
        assert_eq!(ds.skipped.count(), 0);
    }
}

#[test]
fn cars196_folder_layout_and_errors() {
    let tmp = TempDir::new("cars-folders");
    for (i, model) in [
        "Acura TL 2012",
        "BMW M3 2012",
        "Audi A4 2010",
        "Volvo 240 1993",
    ]
    .iter()
    .enumerate()
    {
        write_image(
            &tmp.path().join("images").join(model).join("a.jpg"),
            8,
            8,
            i as u8,
        );
    }
    let ds = folders::load_cars196(tmp.path()).unwrap();
    // Sorted by name, first half train.
    assert_eq!(ds.train_classes, vec!["Acura TL 2012", "Audi A4 2010"]);
    assert_eq!(ds.test_classes, vec!["BMW M3 2012", "Volvo 240 1993"]);

    // Neither layout: the error names cars_annos.mat.
    let empty = TempDir::new("cars-empty");
    let err = folders::load_cars196(empty.path()).unwrap_err();
    assert!(err.to_string().contains("cars_annos.mat"), "{err}");
    // Annotations without car_ims/: the error names the directory.
    write_bytes(&empty.path().join("cars_annos.mat"), &cars_mat(&[], false));
    let err = folders::load_cars196(empty.path()).unwrap_err();
    assert!(err.to_string().contains("car_ims"), "{err}");
    // A truncated .mat is a BadFile error naming the file.
    std::fs::create_dir_all(empty.path().join("car_ims")).unwrap();
    let full = cars_mat(&[("car_ims/x.jpg", 1)], false);
    write_bytes(
        &empty.path().join("cars_annos.mat"),
        &full[..full.len() - 20],
    );
    let err = folders::load_cars196(empty.path()).unwrap_err();
    assert!(matches!(err, DataError::BadFile { .. }), "{err}");
    assert!(err.to_string().contains("cars_annos.mat"));
}

// ---------------------------------------------------------------- In-Shop

#[test]
fn inshop_query_gallery_split() {
    let tmp = TempDir::new("inshop");
    let rows = [
        (
            "img/WOMEN/Dresses/id_00000001/01_1_front.jpg",
            "id_00000001",
            "train",
        ),
        (
            "img/WOMEN/Dresses/id_00000001/01_2_side.jpg",
            "id_00000001",
            "train",
        ),
        (
            "img/MEN/Denim/id_00000007/01_1_front.jpg",
            "id_00000007",
            "train",
        ),
        (
            "img/WOMEN/Skirts/id_00000003/01_1_front.jpg",
            "id_00000003",
            "query",
        ),
        (
            "img/WOMEN/Skirts/id_00000003/01_2_side.jpg",
            "id_00000003",
            "gallery",
        ),
        (
            "img/MEN/Tees/id_00000002/01_1_front.jpg",
            "id_00000002",
            "gallery",
        ),
        (
            "img/MEN/Tees/id_00000002/01_2_side.jpg",
            "id_00000002",
            "query",
        ),
    ];
    let mut list = format!("{}\nimage_name item_id evaluation_status\n", rows.len());
    for (i, (p, id, status)) in rows.iter().enumerate() {
        write_image(&tmp.path().join(p), 8, 12, i as u8);
        list.push_str(&format!("{p}   {id}   {status}\n"));
    }
    let list_path = tmp.path().join("Eval/list_eval_partition.txt");
    write_bytes(&list_path, list.as_bytes());

    let ds = lists::load_inshop(tmp.path()).unwrap();
    assert_eq!(ds.train.len(), 3);
    assert_eq!(ds.num_train_classes(), 2);
    assert_eq!(ds.num_test_classes(), 2);
    let query = ds.query().unwrap();
    let gallery = ds.gallery().unwrap();
    assert_eq!((query.len(), gallery.len()), (2, 2));
    // id_00000002 -> 0, id_00000003 -> 1 in both query and gallery.
    assert_eq!(
        query.iter().map(|s| s.label).collect::<Vec<_>>(),
        vec![1, 0]
    );
    assert_eq!(
        gallery.iter().map(|s| s.label).collect::<Vec<_>>(),
        vec![1, 0]
    );

    // A malformed line is reported with its line number.
    list.push_str("img/x.jpg id_9\n");
    write_bytes(&list_path, list.as_bytes());
    let err = lists::load_inshop(tmp.path()).unwrap_err();
    assert!(
        matches!(err, DataError::MalformedLine { line: 10, .. }),
        "{err}"
    );

    let missing = TempDir::new("inshop-missing");
    let err = lists::load_inshop(missing.path()).unwrap_err();
    assert!(matches!(err, DataError::MissingFile { .. }));
    assert!(err.to_string().contains("list_eval_partition.txt"));
}

// ---------------------------------------------------------------- SOP

#[test]
fn sop_lists_and_missing_images() {
    let tmp = TempDir::new("sop");
    let root = tmp.path().join("Stanford_Online_Products");
    let train = [
        (1, 1, 1, "bicycle_final/111_0.JPG"),
        (2, 1, 1, "bicycle_final/111_1.JPG"),
        (3, 5, 2, "chair_final/555_0.JPG"),
    ];
    let test = [
        (4, 11319, 12, "toaster_final/9_0.JPG"),
        (5, 11318, 12, "toaster_final/8_0.JPG"),
        (6, 11318, 12, "toaster_final/8_1.JPG"), // listed but missing on disk
    ];
    let write_list = |name: &str, rows: &[(i32, i32, i32, &str)]| {
        let mut text = String::from("image_id class_id super_class_id path\n");
        for (id, class, sup, p) in rows {
            text.push_str(&format!("{id} {class} {sup} {p}\n"));
        }
        write_bytes(&root.join("Info_Files").join(name), text.as_bytes());
    };
    write_list("Ebay_train.txt", &train);
    write_list("Ebay_test.txt", &test);
    for (i, (_, _, _, p)) in train.iter().chain(&test[..2]).enumerate() {
        write_image(&root.join(p), 8, 8, i as u8);
    }
    // Uppercase .JPG is still found by the header check (format from content).
    let ds = lists::load_sop(tmp.path()).unwrap();
    assert_eq!(ds.train.len(), 3);
    assert_eq!(ds.num_train_classes(), 2);
    assert_eq!(ds.test.len(), 2);
    assert_eq!(ds.num_test_classes(), 2);
    assert_eq!(
        ds.test.iter().map(|s| s.label).collect::<Vec<_>>(),
        vec![1, 0]
    );
    assert_eq!(ds.skipped.count(), 1);
    assert!(ds.skipped.skipped[0].0.ends_with("8_1.JPG"));

    // A list entry that leads outside the dataset folder is refused, naming the line.
    let mut escaping = test.to_vec();
    escaping[1].3 = "../../etc/passwd";
    write_list("Ebay_test.txt", &escaping);
    let err = lists::load_sop(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains("Ebay_test.txt") && err.contains("line 3"),
        "{err}"
    );
    assert!(err.contains("outside"), "{err}");

    let missing = TempDir::new("sop-missing");
    let err = lists::load_sop(missing.path()).unwrap_err();
    assert!(err.to_string().contains("Info_Files"), "{err}");
}

// ---------------------------------------------------------------- ImageFolder

#[test]
fn image_folder_split_and_errors() {
    let tmp = TempDir::new("folder");
    for (i, class) in ["cat", "ant", "dog"].iter().enumerate() {
        write_image(&tmp.path().join(class).join("x.png"), 6, 6, i as u8);
        write_image(&tmp.path().join(class).join("sub/y.jpg"), 6, 6, i as u8);
    }
    let ds = folders::load_image_folder(tmp.path()).unwrap();
    assert_eq!(ds.train_classes, vec!["ant"]);
    assert_eq!(ds.test_classes, vec!["cat", "dog"]);
    assert_eq!(ds.train.len(), 2);
    assert_eq!(ds.test.len(), 4);

    let err = folders::load_image_folder(&tmp.path().join("nope")).unwrap_err();
    assert!(matches!(err, DataError::MissingDir { .. }));
    assert!(err.to_string().contains("nope"));
}

/// A small valid PNG whose header claims `w` x `h` 8-bit RGB pixels (one empty data chunk).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
        out
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// A decompression bomb (a header claiming 100,000 x 100,000 pixels) is skipped when the dataset
/// loads, named with its reason, exactly as a corrupt file is: it never reaches the batch
/// loader, where a failed decode would become a grey image that counts in the metrics.
#[test]
fn decompression_bombs_are_skipped_like_corrupt_images() {
    let tmp = TempDir::new("bomb");
    for (i, class) in ["a", "b", "c", "d"].iter().enumerate() {
        write_image(&tmp.path().join(class).join("x.png"), 6, 6, i as u8);
    }
    write_bytes(
        &tmp.path().join("c/bomb.png"),
        &png_claiming(100_000, 100_000),
    );
    write_bytes(&tmp.path().join("d/corrupt.png"), b"\x89PNG\r\n\x1a\nshort");
    let ds = folders::load_image_folder(tmp.path()).unwrap();
    assert_eq!(
        ds.test.len(),
        2,
        "neither the bomb nor the corrupt file is a sample"
    );
    let reasons: Vec<String> = ds
        .skipped
        .skipped
        .iter()
        .map(|(p, r)| format!("{}: {r}", p.display()))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].contains("bomb.png") && reasons[0].contains("100000x100000"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("corrupt.png"), "{reasons:?}");
    // An image of ordinary size with the same kind of header passes the check.
    write_bytes(&tmp.path().join("c/ok.png"), &png_claiming(64, 64));
    assert!(data::check_image_header(&tmp.path().join("c/ok.png")).is_ok());
}

// ---------------------------------------------------------------- Fashion-MNIST (IDX)

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        out.extend(d.to_be_bytes());
    }
    out.extend(data);
    out
}

fn write_idx(path: &Path, bytes: &[u8], gz: bool) {
    if gz {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        write_bytes(path, &enc.finish().unwrap());
    } else {
        write_bytes(path, bytes);
    }
}

/// Writes a tiny 4x3 "Fashion-MNIST" with labels 0..9 repeated; pixel = index.
fn make_fmnist(dir: &Path, gz: bool, n_train: usize, n_test: usize) {
    let suffix = if gz { ".gz" } else { "" };
    for (prefix, n) in [("train", n_train), ("t10k", n_test)] {
        let pixels: Vec<u8> = (0..n * 12).map(|i| (i / 12) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        write_idx(
            &dir.join(format!("{prefix}-images-idx3-ubyte{suffix}")),
            &idx_bytes(&[n as u32, 3, 4], &pixels),
            gz,
        );
        write_idx(
            &dir.join(format!("{prefix}-labels-idx1-ubyte{suffix}")),
            &idx_bytes(&[n as u32], &labels),
            gz,
        );
    }
}

#[test]
fn idx_parsing_plain_and_gz() {
    for gz in [false, true] {
        let tmp = TempDir::new("fmnist");
        make_fmnist(tmp.path(), gz, 30, 20);
        let ds = fashion_mnist::load_fashion_mnist(tmp.path(), FashionSplit::Standard).unwrap();
        assert_eq!((ds.train.len(), ds.test.len()), (30, 20));
        assert_eq!(ds.num_train_classes(), 10);
        match &ds.train[7].source {
            ImageSource::Memory(m) => {
                assert_eq!((m.width, m.height, m.channels), (4, 3, 1));
                assert!(m.pixels.iter().all(|&p| p == 7));
            }
            other => panic!("expected an in-memory image, got {other:?}"),
        }
        assert_eq!(ds.train[7].label, 7);

        let zs = fashion_mnist::load_fashion_mnist(tmp.path(), FashionSplit::ZeroShot).unwrap();
        assert_eq!(zs.train_classes.len(), 5);
        assert_eq!(zs.test_classes[0], "Sandal");
        assert_eq!((zs.train.len(), zs.test.len()), (15, 10));
        assert!(zs.train.iter().chain(&zs.test).all(|s| s.label < 5));
        // Test image 5 (class 5) is the first test sample, with label 0.
        match &zs.test[0].source {
            ImageSource::Memory(m) => assert_eq!(m.pixels[0], 5),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn idx_errors_name_the_file() {
    let tmp = TempDir::new("fmnist-bad");
    let err = fashion_mnist::load_fashion_mnist(tmp.path(), FashionSplit::Standard).unwrap_err();
    assert!(err.to_string().contains("train-images-idx3-ubyte"), "{err}");
    assert!(err.to_string().contains("dataset-fashion-mnist"));
    make_fmnist(tmp.path(), false, 10, 10);
    // Truncate the image file: the size check catches it.
    let p = tmp.path().join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
    let err = fashion_mnist::load_fashion_mnist(tmp.path(), FashionSplit::Standard).unwrap_err();
    assert!(matches!(err, DataError::BadFile { .. }), "{err}");
    assert!(fashion_mnist::parse_idx(&[1, 2, 3]).is_err());
}

/// The real data set, where installed (Debian's dataset-fashion-mnist, or
/// ROBUST_DML_FASHION_MNIST_DIR); skipped otherwise.
#[test]
fn real_fashion_mnist_if_installed() {
    let dir = std::env::var("ROBUST_DML_FASHION_MNIST_DIR")
        .unwrap_or_else(|_| fashion_mnist::DEFAULT_DIR.to_string());
    if !Path::new(&dir).join("t10k-labels-idx1-ubyte.gz").exists()
        && !Path::new(&dir).join("t10k-labels-idx1-ubyte").exists()
    {
        eprintln!("skipping: no Fashion-MNIST in {dir}");
        return;
    }
    let ds = fashion_mnist::load_fashion_mnist(Path::new(&dir), FashionSplit::Standard).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (60_000, 10_000));
    let zs = fashion_mnist::load_fashion_mnist(Path::new(&dir), FashionSplit::ZeroShot).unwrap();
    assert_eq!((zs.train.len(), zs.test.len()), (30_000, 5_000));
}

/// The subset compiled into the binary: the zero-shot split, class-balanced, with the counts
/// its README states, under the 4 MB it may take, and images that are real (not blank).
#[test]
fn embedded_fashion_mnist_is_the_balanced_zero_shot_subset() {
    let ds = data::load(&DatasetKind::parse("fashion-mnist-embedded").unwrap(), None).unwrap();
    assert_eq!(ds.name, "fashion-mnist-embedded");
    assert_eq!((ds.train.len(), ds.test.len()), (5_000, 2_000));
    let per_class = |samples: &[robust_dml::data::Sample]| {
        let mut counts = vec![0usize; 5];
        for s in samples {
            counts[s.label] += 1;
        }
        counts
    };
    assert_eq!(per_class(&ds.train), vec![1_000; 5]);
    assert_eq!(per_class(&ds.test), vec![400; 5]);
    assert_eq!(ds.train_classes[0], "T-shirt/top");
    assert_eq!(ds.test_classes[0], "Sandal");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-subset");
    let bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(bytes <= 4 << 20, "the embedded subset takes {bytes} bytes");
    assert!(dir.join("LICENSE").exists());
    let ImageSource::Memory(img) = &ds.test[0].source else {
        panic!("embedded images are in memory")
    };
    assert!(img.pixels.iter().any(|&p| p > 100) && img.pixels.contains(&0));
}

// ---------------------------------------------------------------- synthetic

fn small_synthetic(seed: u64) -> SyntheticConfig {
    SyntheticConfig {
        num_classes: 40,
        train_per_class: 6,
        test_per_class: 6,
        image_size: 32,
        seed,
    }
}

#[test]
fn synthetic_is_deterministic_and_class_disjoint() {
    let a = synthetic::load_synthetic(&small_synthetic(3)).unwrap();
    let b = synthetic::load_synthetic(&small_synthetic(3)).unwrap();
    let c = synthetic::load_synthetic(&small_synthetic(4)).unwrap();
    assert_eq!(a.train, b.train);
    assert_eq!(a.test, b.test);
    assert_ne!(a.train, c.train);
    assert_eq!((a.num_train_classes(), a.num_test_classes()), (20, 20));
    assert_eq!((a.train.len(), a.test.len()), (120, 120));
    // Class names are unique and the two splits share none.
    let mut names = a.train_classes.clone();
    names.extend(a.test_classes.clone());
    let mut dedup = names.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 40);
    // Instances of one class differ.
    assert_ne!(a.train[0].source, a.train[1].source);
    assert!(synthetic::load_synthetic(&SyntheticConfig {
        num_classes: 1,
        ..small_synthetic(0)
    })
    .is_err());
    // Command-line names.
    assert_eq!(DatasetKind::parse("CUB200").unwrap(), DatasetKind::Cub200);
    assert_eq!(
        DatasetKind::parse("fashion-mnist-zero-shot").unwrap(),
        DatasetKind::FashionMnist(FashionSplit::ZeroShot)
    );
    assert!(DatasetKind::parse("imagenet").is_err());
    // Same data through the generic entry point.
    let d = data::load(&DatasetKind::Synthetic(small_synthetic(3)), None).unwrap();
    assert_eq!(d.train, a.train);
}

/// Raw pixels carry some class signal (above chance) but are far from solving the task: the
/// synthetic set needs a learned embedding.
#[test]
fn synthetic_is_not_trivial_for_raw_pixels() {
    let ds = synthetic::load_synthetic(&SyntheticConfig {
        train_per_class: 1,
        test_per_class: 20,
        ..small_synthetic(0)
    })
    .unwrap();
    let mut emb = Vec::new();
    let mut labels = Vec::new();
    for s in &ds.test {
        let ImageSource::Memory(m) = &s.source else {
            panic!("in-memory expected")
        };
        let mean = m.pixels.iter().map(|&p| p as f32).sum::<f32>() / m.pixels.len() as f32;
        let v: Vec<f32> = m.pixels.iter().map(|&p| p as f32 - mean).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
        emb.extend(v.iter().map(|x| x / norm));
        labels.push(s.label);
    }
    let r1 = robust_dml::dml::metrics::recall_at_k(&emb, 32 * 32 * 3, &labels, &[1]).unwrap()[0];
    eprintln!("raw-pixel Recall@1 on synthetic test classes: {r1:.3}");
    assert!(r1 > 0.06 && r1 < 0.6, "raw-pixel Recall@1 {r1}");
}

// ---------------------------------------------------------------- transforms

fn gradient_image(w: usize, h: usize) -> RgbImage {
    let mut pixels = Vec::new();
    for y in 0..h {
        for x in 0..w {
            pixels.extend([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 77]);
        }
    }
    RgbImage {
        width: w,
        height: h,
        pixels,
    }
}

#[test]
fn transforms_output_shape_and_range() {
    let img = gradient_image(37, 23);
    let mut rng = Rng::new(1);
    for augment in [Augment::Train, Augment::Test, Augment::Resize] {
        let t = ImageTransform { size: 16, augment };
        let mut out = vec![-1.0f32; t.output_len()];
        t.apply(&img, &mut rng, &mut out);
        assert_eq!(out.len(), 3 * 16 * 16);
        assert!(out.iter().all(|v| (0.0..=1.0).contains(v)), "{augment:?}");
        // Blue channel is constant 77/255 whatever the crop.
        assert!(out[2 * 256..]
            .iter()
            .all(|&v| (v - 77.0 / 255.0).abs() < 1e-5));
    }
}

#[test]
fn resize_to_same_size_is_identity_and_flip_mirrors() {
    let t = ImageTransform {
        size: 8,
        augment: Augment::Resize,
    };
    let sq = gradient_image(8, 8);
    let mut out = vec![0f32; t.output_len()];
    t.apply(&sq, &mut Rng::new(0), &mut out);
    for y in 0..8 {
        for x in 0..8 {
            let want = sq.pixels[(y * 8 + x) * 3] as f32 / 255.0;
            assert!((out[y * 8 + x] - want).abs() < 1e-6);
        }
    }
    let before = out.clone();
    flip_horizontal(&mut out, 8, 8);
    assert_eq!(out[0], before[7]);
    assert_eq!(out[2 * 64 + 8], before[2 * 64 + 15]);
}

#[test]
fn crop_boxes_follow_torchvision() {
    // Test transform at 224 on a 500x375 image: shorter side 375 -> 256, longer 500 -> 341
    // (truncated), crop left = round(117 / 2) = 58 (ties to even), top = 16.
    let b = centre_crop_box(500, 375, 224);
    let sx = 500.0 / 341.0;
    let sy = 375.0 / 256.0;
    assert!((b.x - 58.0 * sx).abs() < 1e-9 && (b.width - 224.0 * sx).abs() < 1e-9);
    assert!((b.y - 16.0 * sy).abs() < 1e-9 && (b.height - 224.0 * sy).abs() < 1e-9);
    // Random resized crops stay inside the image with area in [0.08, 1] and ratio in [3/4, 4/3]
    // (up to rounding), or fall back to the centre.
    let mut rng = Rng::new(5);
    for _ in 0..500 {
        let b = random_resized_crop_box(60, 40, &mut rng);
        assert!(b.x >= 0.0 && b.y >= 0.0 && b.x + b.width <= 60.0 && b.y + b.height <= 40.0);
        let area = b.width * b.height / 2400.0;
        assert!((0.07..=1.0).contains(&area), "area {area}");
    }
    // A very wide image with few pixels: always valid.
    let b = random_resized_crop_box(100, 2, &mut rng);
    assert!(b.width <= 100.0 && b.height <= 2.0 && b.width > 0.0);
}

#[test]
fn decode_gray_png_to_three_channels() {
    let tmp = TempDir::new("gray");
    let p = tmp.path().join("g.png");
    image::GrayImage::from_fn(5, 4, |x, _| image::Luma([x as u8 * 50]))
        .save(&p)
        .unwrap();
    let img = decode_file(&p).unwrap();
    assert_eq!((img.width, img.height, img.pixels.len()), (5, 4, 60));
    assert_eq!(&img.pixels[3..6], &[50, 50, 50]);
    write_bytes(&tmp.path().join("bad.png"), b"\x89PNG\r\n\x1a\nshort");
    assert!(matches!(
        decode_file(&tmp.path().join("bad.png")),
        Err(DataError::CorruptImage { .. })
    ));
}

// ---------------------------------------------------------------- batch loader

fn loader_samples() -> Vec<data::Sample> {
    synthetic::load_synthetic(&SyntheticConfig {
        num_classes: 4,
        train_per_class: 5,
        test_per_class: 1,
        image_size: 20,
        seed: 9,
    })
    .unwrap()
    .train
}

fn collect(loader: &BatchLoader, epoch: u64, start: usize) -> Vec<data::Batch> {
    loader.epoch_from(epoch, start).collect()
}

#[test]
fn loader_is_deterministic_across_runs_and_workers() {
    let samples = loader_samples();
    let cfg = |workers| LoaderConfig {
        workers,
        prefetch: 2,
        ..LoaderConfig::train(3, 12, 42)
    };
    let reference = collect(&BatchLoader::new(samples.clone(), cfg(0)).unwrap(), 1, 0);
    assert_eq!(reference.len(), 10 / 3);
    for workers in [1, 2, 3, 5] {
        let loader = BatchLoader::new(samples.clone(), cfg(workers)).unwrap();
        assert_eq!(collect(&loader, 1, 0), reference, "{workers} workers");
        assert_eq!(collect(&loader, 1, 0), reference, "second run");
    }
    let b = &reference[0];
    assert_eq!(b.images.len(), 3 * 3 * 12 * 12);
    assert_eq!(b.batch_index, 0);
    assert!(b.images.iter().all(|v| (0.0..=1.0).contains(v)));
    for (label, &i) in b.labels.iter().zip(&b.indices) {
        assert_eq!(*label, samples[i].label);
    }
    // drop_last: 10 samples / 3 = 3 full batches, 9 distinct samples.
    let mut seen: Vec<usize> = reference.iter().flat_map(|b| b.indices.clone()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 9);
    // Another epoch shuffles differently (and augments differently).
    let loader = BatchLoader::new(samples.clone(), cfg(2)).unwrap();
    assert_ne!(loader.order(1), loader.order(2));
    let other = collect(&loader, 2, 0);
    assert_ne!(other[0].images, reference[0].images);
}

#[test]
fn loader_resume_and_eval_mode() {
    let samples = loader_samples();
    let loader = BatchLoader::new(samples.clone(), LoaderConfig::train(3, 8, 7)).unwrap();
    let full = collect(&loader, 4, 0);
    let resumed = collect(&loader, 4, 2);
    assert_eq!(resumed.as_slice(), &full[2..]);
    assert_eq!(resumed[0].batch_index, 2);
    // Stopping early must not hang (workers blocked on a full queue exit).
    let mut it = loader.epoch(5);
    assert!(it.next().is_some());
    drop(it);

    let eval = BatchLoader::new(samples.clone(), LoaderConfig::eval(4, 8)).unwrap();
    let batches = collect(&eval, 0, 0);
    assert_eq!(eval.batches_per_epoch(), 3);
    assert_eq!(
        batches.iter().map(|b| b.len()).collect::<Vec<_>>(),
        vec![4, 4, 2]
    );
    let order: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(order, (0..10).collect::<Vec<_>>());
    // Evaluation is the same whatever the epoch.
    assert_eq!(collect(&eval, 3, 0), batches);
    let t = batches[0]
        .images_tensor(&robust_dml::engine::Device::Cpu)
        .unwrap();
    assert_eq!(t.shape(), &[4, 3, 8, 8]);
}

#[test]
fn loader_decodes_files_and_counts_failures() {
    let tmp = TempDir::new("loader-files");
    let good = tmp.path().join("a/good.jpg");
    write_image(&good, 30, 20, 1);
    // A PNG whose header (and so the load-time check) is fine but whose data is cut off.
    let full_png = tmp.path().join("a/full.png");
    write_image(&full_png, 30, 20, 2);
    let bytes = std::fs::read(&full_png).unwrap();
    let cut = tmp.path().join("a/cut.png");
    write_bytes(&cut, &bytes[..40]);
    assert!(robust_dml::data::transform::decode_file(&cut).is_err());
    let samples = vec![
        data::Sample {
            source: ImageSource::File(good),
            label: 0,
        },
        data::Sample {
            source: ImageSource::File(cut),
            label: 1,
        },
    ];
    let loader = BatchLoader::new(samples, LoaderConfig::eval(2, 10)).unwrap();
    let batch = loader.epoch(0).next().unwrap();
    assert_eq!(batch.images.len(), 2 * 3 * 100);
    assert_eq!(loader.decode_failures(), 1);
    assert!(batch.images[300..].iter().all(|&v| v == 0.5));
    assert!(batch.images[..300].iter().any(|&v| v != 0.5));
}

/// In-memory small images (synthetic, Fashion-MNIST) keep their whole frame: training flips,
/// evaluation resizes; file-backed photographs keep the crop transforms.
#[test]
fn small_in_memory_images_are_not_cropped() {
    use robust_dml::data::transform::Augment;
    let mem = loader_samples();
    assert_eq!(
        LoaderConfig::train(3, 20, 1)
            .for_samples(&mem)
            .transform
            .augment,
        Augment::Flip
    );
    assert_eq!(
        LoaderConfig::eval(3, 20)
            .for_samples(&mem)
            .transform
            .augment,
        Augment::Resize
    );
    let files = vec![data::Sample {
        source: ImageSource::File(PathBuf::from("a.jpg")),
        label: 0,
    }];
    assert_eq!(
        LoaderConfig::train(3, 20, 1)
            .for_samples(&files)
            .transform
            .augment,
        Augment::Train
    );
    // Flip keeps every pixel: the output is the image or its mirror.
    let img = gradient_image(6, 6);
    let t = ImageTransform {
        size: 6,
        augment: Augment::Flip,
    };
    let (mut plain, mut flipped) = (vec![0.0; 108], vec![0.0; 108]);
    ImageTransform {
        size: 6,
        augment: Augment::Resize,
    }
    .apply(&img, &mut Rng::new(0), &mut plain);
    let mut seen = [false; 2];
    for seed in 0..16 {
        t.apply(&img, &mut Rng::new(seed), &mut flipped);
        let mirrored = (0..108).all(|i| flipped[i] == plain[(i / 6) * 6 + 5 - i % 6]);
        assert!(
            flipped == plain || mirrored,
            "seed {seed}: neither the image nor its mirror"
        );
        seen[mirrored as usize] = true;
    }
    assert!(
        seen[0] && seen[1],
        "flip never (or always) happened in 16 draws"
    );
}

/// A PNG whose header claims 50,000 x 50,000 RGB pixels (7.5 GB decoded) in a few dozen bytes:
/// a decompression bomb. The decoder's allocation limit refuses it, and the message says that
/// the image exceeds the image-size limit, not that it is corrupt.
#[test]
fn decompression_bomb_is_named_as_too_large() {
    let png = png_claiming(50_000, 50_000);
    let tmp = TempDir::new("bomb");
    let path = tmp.path().join("bomb.png");
    write_bytes(&path, &png);
    let err = decode_file(&path)
        .expect_err("a 7.5 GB image must be refused")
        .to_string();
    assert!(err.contains("exceeds the image-size limit"), "{err}");
    assert!(err.contains("bomb.png"), "{err}");
    assert!(!err.contains("corrupt"), "{err}");
}
