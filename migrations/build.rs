//! Embeds every migration folder under `sql/` (diesel's `VERSION_name/{up,down}.sql` layout).
//! A build script rather than a hand-kept list, so that a new folder cannot be forgotten, and
//! `rerun-if-changed` so that cargo notices new folders (diesel's `embed_migrations!` does not).
use std::{env, fs, path::Path};

fn main() {
    let root = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join("sql");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut dirs: Vec<_> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut out = String::from("&[\n");
    for dir in dirs {
        println!("cargo:rerun-if-changed={}", dir.display());
        let folder = dir.file_name().unwrap().to_str().unwrap().to_owned();
        let (version, name) = folder
            .split_once('_')
            .unwrap_or_else(|| panic!("migration folder {folder:?} must be VERSION_name"));
        let version: String = version.chars().filter(char::is_ascii_digit).collect();
        for f in ["up.sql", "down.sql"] {
            assert!(dir.join(f).is_file(), "migration {folder} lacks {f}");
        }
        out.push_str(&format!(
            "    Migration {{ version: {version:?}, name: {name:?}, up: include_str!({up:?}), down: include_str!({down:?}) }},\n",
            up = dir.join("up.sql").display().to_string(),
            down = dir.join("down.sql").display().to_string(),
        ));
    }
    out.push_str("]\n");
    fs::write(
        Path::new(&env::var("OUT_DIR").unwrap()).join("migrations.rs"),
        out,
    )
    .unwrap();
}
