//! Loaders for the folder-per-class layouts: CUB200, CARS196 (both layouts) and ImageFolder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::{require_dir, require_file};
use super::{
    image_files_recursive, list_entry_path, mat, push_checked, read_dir_sorted, DataError,
    DataResult, Dataset, SkipSummary, VisitedDirs,
};

/// One class: a sort key (the original class id), its name and its image files.
struct ClassFiles {
    key: u64,
    name: String,
    files: Vec<PathBuf>,
}

/// Builds a dataset from classes sorted by key; `is_train(position, key)` picks the split. Labels
/// are the class's rank inside its split.
fn split_classes(
    name: &str,
    mut classes: Vec<ClassFiles>,
    is_train: impl Fn(usize, u64) -> bool,
) -> Dataset {
    classes.sort_by_key(|c| c.key);
    let mut ds = Dataset {
        name: name.to_string(),
        train: Vec::new(),
        test: Vec::new(),
        query_count: None,
        train_classes: Vec::new(),
        test_classes: Vec::new(),
        skipped: SkipSummary::default(),
    };
    for (position, class) in classes.into_iter().enumerate() {
        let (samples, names) = if is_train(position, class.key) {
            (&mut ds.train, &mut ds.train_classes)
        } else {
            (&mut ds.test, &mut ds.test_classes)
        };
        let label = names.len();
        names.push(class.name);
        for file in class.files {
            push_checked(samples, &mut ds.skipped, file, label);
        }
    }
    ds
}

/// Class folders directly inside `dir` (sorted by name), each with its image files.
fn class_folders(dir: &Path) -> DataResult<Vec<(String, Vec<PathBuf>)>> {
    let mut out = Vec::new();
    let mut visited = VisitedDirs::default();
    for path in read_dir_sorted(dir)? {
        if !path.is_dir() {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push((name, image_files_recursive(&path, &mut visited)?));
    }
    Ok(out)
}

/// CUB-200-2011: `<dir>/CUB_200_2011/images/NNN.Name/*.jpg` or `<dir>/images/NNN.Name/*.jpg`.
/// Classes 1-100 train, 101-200 test, by the folder's numeric prefix.
pub fn load_cub200(dir: &Path) -> DataResult<Dataset> {
    let candidates = [dir.join("CUB_200_2011").join("images"), dir.join("images")];
    let images = match candidates.iter().find(|p| p.is_dir()) {
        Some(p) => p.clone(),
        None => {
            return Err(DataError::MissingDir {
                what: "CUB200".into(),
                path: candidates[0].clone(),
                hint: format!(
                    "expected CUB_200_2011/images/001.Black_footed_Albatross/*.jpg (or images/ \
                     directly) under {}; extract CUB_200_2011.tgz there or pass the right --data-dir",
                    dir.display()
                ),
            })
        }
    };
    let folders = class_folders(&images)?;
    check_cub_index(&images, &folders)?;
    let mut classes = Vec::new();
    for (name, files) in folders {
        let id = name
            .split('.')
            .next()
            .and_then(|p| p.parse::<u64>().ok())
            .ok_or_else(|| {
                DataError::bad_file(
                    &images.join(&name),
                    "expected a class folder named NNN.Name (e.g. 001.Black_footed_Albatross)",
                )
            })?;
        classes.push(ClassFiles {
            key: id,
            name,
            files,
        });
    }
    Ok(split_classes("cub200", classes, |_, id| id <= 100))
}

/// CUB's own index, `images.txt` beside `images/` (lines `id relative/path.jpg`), when present:
/// an entry leading outside `images/` is refused, naming the line; an entry whose file is not in
/// the class folders is warned about, naming the line. The samples are the folders' images.
fn check_cub_index(images: &Path, folders: &[(String, Vec<PathBuf>)]) -> DataResult<()> {
    let Some(index) = images.parent().map(|p| p.join("images.txt")) else {
        return Ok(());
    };
    if !index.is_file() {
        return Ok(());
    }
    let text = super::lists::read_text(&index)?;
    let found: std::collections::HashSet<&PathBuf> =
        folders.iter().flat_map(|(_, files)| files).collect();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let rel = match fields.as_slice() {
            [] => continue,
            [_, rel] => *rel,
            _ => {
                return Err(DataError::malformed(
                    &index,
                    i + 1,
                    format!("expected 'image_id relative/path.jpg', got '{line}'"),
                ))
            }
        };
        let path = list_entry_path(images, rel, &index, i + 1)?;
        if !found.contains(&path) {
            eprintln!(
                "warning: {} line {}: {rel} is listed but not an image of the class folders \
                 under {}; it is not used",
                index.display(),
                i + 1,
                images.display()
            );
        }
    }
    Ok(())
}

/// CARS196: `<dir>/car_ims/` + `<dir>/cars_annos.mat` (label = class - 1, classes 1-98 train), or
/// one folder per class `<dir>/images/<model name>/` sorted by name, first half (98 of 196) train.
pub fn load_cars196(dir: &Path) -> DataResult<Dataset> {
    let annos = dir.join("cars_annos.mat");
    if annos.is_file() {
        return load_cars196_mat(dir, &annos);
    }
    let images = dir.join("images");
    if images.is_dir() {
        let folders = class_folders(&images)?;
        let half = folders.len() / 2;
        let classes = folders
            .into_iter()
            .enumerate()
            .map(|(i, (name, files))| ClassFiles {
                key: i as u64,
                name,
                files,
            })
            .collect();
        return Ok(split_classes("cars196", classes, |pos, _| pos < half));
    }
    require_file(
        "CARS196",
        &annos,
        &format!(
            "expected car_ims/ + cars_annos.mat, or images/<model name>/*.jpg, under {}; \
             download the Stanford Cars archive (car_ims.tgz and cars_annos.mat) there",
            dir.display()
        ),
    )?;
    unreachable!("require_file errors when the file is missing")
}

fn load_cars196_mat(dir: &Path, annos: &Path) -> DataResult<Dataset> {
    require_dir(
        "CARS196",
        &dir.join("car_ims"),
        &format!("extract car_ims.tgz into {}", dir.display()),
    )?;
    let entries = mat::read_cars_annotations(annos)?;
    let names = mat::read_cars_class_names(annos).unwrap_or_default();
    let mut by_class: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for (rel, class) in entries {
        if class == 0 {
            return Err(DataError::bad_file(
                annos,
                format!("annotation for {rel} has class 0; classes are numbered from 1"),
            ));
        }
        by_class.entry(class).or_default().push(dir.join(rel));
    }
    let classes = by_class
        .into_iter()
        .map(|(class, files)| ClassFiles {
            key: class,
            name: names
                .get(class as usize - 1)
                .cloned()
                .unwrap_or_else(|| format!("class {class}")),
            files,
        })
        .collect();
    Ok(split_classes("cars196", classes, |_, class| class <= 98))
}

/// ImageFolder: `<dir>/<class>/**/*.{jpg,png}`; classes sorted by name, first half train.
pub fn load_image_folder(dir: &Path) -> DataResult<Dataset> {
    require_dir(
        "ImageFolder",
        dir,
        "pass --data-dir pointing at a directory with one sub-directory per class",
    )?;
    let folders = class_folders(dir)?;
    if folders.len() < 2 {
        return Err(DataError::Invalid(format!(
            "ImageFolder: {} has {} class folder(s); a class-disjoint split needs at least 2",
            dir.display(),
            folders.len()
        )));
    }
    let half = folders.len() / 2;
    let classes = folders
        .into_iter()
        .enumerate()
        .map(|(i, (name, files))| ClassFiles {
            key: i as u64,
            name,
            files,
        })
        .collect();
    Ok(split_classes("imagefolder", classes, |pos, _| pos < half))
}
