//! Loaders driven by list files: In-Shop (`Eval/list_eval_partition.txt`) and SOP
//! (`Info_Files/Ebay_{train,test}.txt`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::{require_dir, require_file};
use super::{list_entry_path, push_checked, DataError, DataResult, Dataset, Sample, SkipSummary};

/// A list file's text (only regular files that fit in memory), with an error naming it.
pub(super) fn read_text(path: &Path) -> DataResult<String> {
    crate::files::read_regular_to_string(path).map_err(|e| DataError::io(path, e))
}

/// Maps original class keys to contiguous labels in sorted key order.
fn label_map<K: Ord + Clone>(keys: impl Iterator<Item = K>) -> BTreeMap<K, usize> {
    let mut map: BTreeMap<K, usize> = keys.map(|k| (k, 0)).collect();
    for (i, v) in map.values_mut().enumerate() {
        *v = i;
    }
    map
}

/// In-Shop Clothes Retrieval: `<dir>/img/...` + `<dir>/Eval/list_eval_partition.txt` with lines
/// `image_name item_id evaluation_status` (train / query / gallery). Item ids are the classes;
/// query and gallery share one label map.
pub fn load_inshop(dir: &Path) -> DataResult<Dataset> {
    let list = dir.join("Eval").join("list_eval_partition.txt");
    require_file(
        "In-Shop",
        &list,
        &format!(
            "expected Eval/list_eval_partition.txt and img/ under {}; extract the In-shop \
             Clothes Retrieval Benchmark there",
            dir.display()
        ),
    )?;
    require_dir(
        "In-Shop",
        &dir.join("img"),
        &format!("extract img.zip into {}", dir.display()),
    )?;
    let text = read_text(&list)?;
    let mut rows: Vec<(PathBuf, String, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Line 1 is the image count and line 2 the column header; both are skipped by shape.
        if fields.is_empty() || (i < 2 && (fields.len() == 1 || fields[0] == "image_name")) {
            continue;
        }
        if fields.len() != 3 {
            return Err(DataError::malformed(
                &list,
                i + 1,
                format!("expected 'image_name item_id evaluation_status', got '{line}'"),
            ));
        }
        let status = fields[2];
        if !matches!(status, "train" | "query" | "gallery") {
            return Err(DataError::malformed(
                &list,
                i + 1,
                format!("evaluation_status '{status}' is not train, query or gallery"),
            ));
        }
        let path = list_entry_path(dir, fields[0], &list, i + 1)?;
        rows.push((path, fields[1].into(), status.into()));
    }
    let train_ids = label_map(rows.iter().filter(|r| r.2 == "train").map(|r| r.1.clone()));
    let test_ids = label_map(rows.iter().filter(|r| r.2 != "train").map(|r| r.1.clone()));
    let mut skipped = SkipSummary::default();
    let (mut train, mut query, mut gallery) = (Vec::new(), Vec::new(), Vec::new());
    for (path, id, status) in &rows {
        let path = path.clone();
        match status.as_str() {
            "train" => push_checked(&mut train, &mut skipped, path, train_ids[id]),
            "query" => push_checked(&mut query, &mut skipped, path, test_ids[id]),
            _ => push_checked(&mut gallery, &mut skipped, path, test_ids[id]),
        }
    }
    let query_count = query.len();
    let mut test = query;
    test.append(&mut gallery);
    Ok(Dataset {
        name: "inshop".into(),
        train,
        test,
        query_count: Some(query_count),
        train_classes: train_ids.into_keys().collect(),
        test_classes: test_ids.into_keys().collect(),
        skipped,
    })
}

/// Reads one SOP list: header `image_id class_id super_class_id path`, then one image per line.
/// Paths are `root`-relative, and refused when they lead outside it.
fn read_sop_list(root: &Path, list: &Path) -> DataResult<Vec<(u64, PathBuf)>> {
    let text = read_text(list)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() || (i == 0 && fields[0] == "image_id") {
            continue;
        }
        let class = fields.get(1).and_then(|c| c.parse::<u64>().ok());
        match (fields.len(), class) {
            (4, Some(class)) => out.push((class, list_entry_path(root, fields[3], list, i + 1)?)),
            _ => {
                return Err(DataError::malformed(
                    list,
                    i + 1,
                    format!("expected 'image_id class_id super_class_id path', got '{line}'"),
                ))
            }
        }
    }
    Ok(out)
}

/// Stanford Online Products: `<dir>/Info_Files/Ebay_train.txt`, `Ebay_test.txt`, image paths
/// relative to `<dir>` (`<category>_final/...`). Also accepts `<dir>/Stanford_Online_Products/`.
pub fn load_sop(dir: &Path) -> DataResult<Dataset> {
    let nested = dir.join("Stanford_Online_Products");
    let root = if !dir.join("Info_Files").is_dir() && nested.join("Info_Files").is_dir() {
        nested
    } else {
        dir.to_path_buf()
    };
    let hint = format!(
        "expected Info_Files/Ebay_train.txt, Info_Files/Ebay_test.txt and <category>_final/ \
         folders under {}; extract Stanford_Online_Products.zip there",
        dir.display()
    );
    require_dir("SOP", &root.join("Info_Files"), &hint)?;
    let mut skipped = SkipSummary::default();
    let mut split = |file: &str| -> DataResult<(Vec<Sample>, Vec<String>)> {
        let list = root.join("Info_Files").join(file);
        require_file("SOP", &list, &hint)?;
        let rows = read_sop_list(&root, &list)?;
        let labels = label_map(rows.iter().map(|r| r.0));
        let mut samples = Vec::with_capacity(rows.len());
        for (class, path) in rows {
            push_checked(&mut samples, &mut skipped, path, labels[&class]);
        }
        let names = labels.into_keys().map(|c| format!("product {c}")).collect();
        Ok((samples, names))
    };
    let (train, train_classes) = split("Ebay_train.txt")?;
    let (test, test_classes) = split("Ebay_test.txt")?;
    Ok(Dataset {
        name: "sop".into(),
        train,
        test,
        query_count: None,
        train_classes,
        test_classes,
        skipped,
    })
}
