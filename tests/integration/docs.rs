//! The repository documents itself: no product file points outside it, and every relative link in
//! the documentation reaches a file that exists.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Product files: sources, docs, configuration, chart, CI, container build.
fn product_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !matches!(name.as_str(), "target" | ".git" | "node_modules") {
                product_files(&path, out);
            }
        } else if name == "Dockerfile"
            || name == "run"
            || [
                "rs", "md", "toml", "yaml", "tpl", "txt", "json", "py", "mjs", "sql",
            ]
            .iter()
            .any(|ext| name.ends_with(&format!(".{ext}")))
        {
            out.push(path);
        }
    }
}

#[test]
fn no_product_file_points_outside_the_repository() {
    let mut files = vec![];
    product_files(root(), &mut files);
    assert!(files.iter().any(|f| f.ends_with("README.md")));
    // Built at run time so that this file does not match itself.
    let outside = [
        format!("{}/shared", ".."),
        format!("{}.md", "DESIGN"),
        format!("{}.md", "STYLE"),
    ];
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for needle in &outside {
            assert!(
                !text.contains(needle.as_str()),
                "{} mentions {needle}",
                file.display()
            );
        }
    }
}

#[test]
fn relative_links_in_the_documentation_resolve() {
    let mut docs = vec![root().join("README.md"), root().join("SECURITY.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        docs.push(entry.unwrap().path());
    }
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        for link in text.split("](").skip(1) {
            let target = link.split(')').next().unwrap();
            let target = target.split('#').next().unwrap();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let resolved = doc.parent().unwrap().join(target);
            assert!(
                resolved.exists(),
                "{} links to {target}, which does not exist",
                doc.display()
            );
        }
    }
}

#[test]
fn the_operate_walkthrough_configures_the_tenants_identity_provider() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let operate = readme
        .split("\n## Operate it\n")
        .nth(1)
        .expect("an Operate section")
        .split("\n## ")
        .next()
        .unwrap();
    let create = operate.find("admin tenant create").expect("tenant create");
    let set_idp = operate
        .find("admin tenant set-idp")
        .expect("tenant set-idp");
    assert!(create < set_idp, "set-idp must follow tenant create");
}
