//! The documentation's checks, run by `cargo test -p xtask` (and so by `cargo xtask test`):
//! the top-level README stays short, and every relative link in the project's Markdown files
//! resolves — to an existing file, and for `file#anchor` or `#anchor` to a heading of that file
//! with that GitHub slug (lowercase, spaces to `-`, punctuation removed, `-1`, `-2` for repeats).
//!
//! Links are `[text](target)`, `![alt](target)` and reference definitions `[id]: target`, read
//! outside fenced code blocks and inline code spans. Targets starting with `http://`, `https://`
//! or `mailto:` are not checked.

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeSet, HashMap},
        fs,
        path::{Path, PathBuf},
    };

    /// The README's size limit, in bytes.
    const README_MAX: usize = 15 * 1024;

    /// The Markdown files that must exist and whose links are checked (every `*.md` under
    /// `docs/` is checked too).
    const FILES: [&str; 11] = [
        "README.md",
        "BENCHMARKS.md",
        "CHANGELOG.md",
        "python/README.md",
        "shared/README.md",
        "firmware/README.md",
        "models/README.md",
        "docs/guide.md",
        "docs/fidelity.md",
        "docs/results.md",
        "docs/architecture.md",
    ];

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// `FILES` plus every `*.md` under `dir`'s `docs/`, each once, in a stable order.
    fn markdown_files(dir: &Path) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "md") {
                    out.insert(path);
                }
            }
        }
        let mut files: BTreeSet<PathBuf> = FILES.iter().map(|f| dir.join(f)).collect();
        walk(&dir.join("docs"), &mut files);
        files.into_iter().collect()
    }

    /// The lines outside fenced code blocks, numbered from 1.
    fn outside_fences(text: &str) -> Vec<(usize, &str)> {
        let mut out = Vec::new();
        let mut fence: Option<(char, usize)> = None;
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim_start();
            if let Some(c) = trimmed.chars().next().filter(|c| *c == '`' || *c == '~') {
                let run = trimmed.chars().take_while(|&x| x == c).count();
                if run >= 3 {
                    match fence {
                        None => fence = Some((c, run)),
                        Some((fc, fr))
                            if fc == c && run >= fr && trimmed[run..].trim().is_empty() =>
                        {
                            fence = None
                        }
                        Some(_) => {}
                    }
                    continue;
                }
            }
            if fence.is_none() {
                out.push((i + 1, line));
            }
        }
        out
    }

    /// `line` with every inline code span (a run of n backticks up to the next run of exactly
    /// n) replaced by spaces; an unmatched run stays as it is.
    fn strip_code_spans(line: &str) -> String {
        let chars: Vec<char> = line.chars().collect();
        let mut out = String::with_capacity(line.len());
        let mut i = 0;
        while i < chars.len() {
            if chars[i] != '`' {
                out.push(chars[i]);
                i += 1;
                continue;
            }
            let run = chars[i..].iter().take_while(|&&c| c == '`').count();
            let mut j = i + run;
            let mut close = None;
            while j < chars.len() {
                if chars[j] == '`' {
                    let r = chars[j..].iter().take_while(|&&c| c == '`').count();
                    if r == run {
                        close = Some(j + r);
                        break;
                    }
                    j += r;
                } else {
                    j += 1;
                }
            }
            match close {
                Some(end) => {
                    out.extend(std::iter::repeat_n(' ', end - i));
                    i = end;
                }
                None => {
                    out.extend(&chars[i..i + run]);
                    i += run;
                }
            }
        }
        out
    }

    /// The link targets of one prose line: inline links and images, and a reference definition.
    fn link_targets(line: &str) -> Vec<String> {
        let mut targets = Vec::new();
        let t = line.trim_start();
        if t.starts_with('[')
            && line.len() - t.len() <= 3
            && let Some(end) = t.find("]:")
            && !t[..end].contains("](")
        {
            if let Some(target) = t[end + 2..].split_whitespace().next() {
                targets.push(target.trim_matches(['<', '>']).to_string());
            }
            return targets;
        }
        let mut from = 0;
        while let Some(pos) = line[from..].find("](").map(|p| from + p) {
            from = pos + 2;
            if !line[..pos].contains('[') {
                continue;
            }
            let after = line[from..].trim_start();
            let start = line.len() - after.len();
            let (target, used) = if let Some(inner) = after.strip_prefix('<') {
                let end = inner.find('>').unwrap_or(inner.len());
                (&inner[..end], (end + 2).min(after.len()))
            } else {
                let mut depth = 0usize;
                let mut end = after.len();
                for (k, c) in after.char_indices() {
                    match c {
                        '(' => depth += 1,
                        ')' if depth == 0 => {
                            end = k;
                            break;
                        }
                        ')' => depth -= 1,
                        c if c.is_whitespace() => {
                            end = k;
                            break;
                        }
                        _ => {}
                    }
                }
                (&after[..end], end)
            };
            targets.push(target.to_string());
            from = start + used;
        }
        targets
    }

    /// GitHub's anchor for a heading's text: inline markup and punctuation removed (letters,
    /// digits, `-` and `_` kept), lowercase, each space a `-`.
    fn slug(heading: &str) -> String {
        heading
            .trim()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                '-' | '_' => Some(c),
                c if c.is_alphanumeric() => Some(c),
                _ => None,
            })
            .flat_map(char::to_lowercase)
            .collect()
    }

    /// Every heading anchor of a Markdown text, repeats numbered as GitHub numbers them.
    fn anchors(text: &str) -> BTreeSet<String> {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut out = BTreeSet::new();
        for (_, line) in outside_fences(text) {
            let t = line.trim_start();
            if line.len() - t.len() > 3 {
                continue;
            }
            let level = t.chars().take_while(|&c| c == '#').count();
            if !(1..=6).contains(&level) || !t[level..].starts_with([' ', '\t']) {
                continue;
            }
            let title = t[level..].trim().trim_end_matches('#').trim_end();
            let base = slug(title);
            let n = seen.entry(base.clone()).or_insert(0);
            out.insert(if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            });
            *n += 1;
        }
        out
    }

    /// `%XX` escapes decoded (GitHub writes spaces in link targets as `%20`).
    fn percent_decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && let Some(hex) = bytes.get(i + 1..i + 3)
                && let Some(v) = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Every broken relative link of `file` (under `root`), as `file:line: target (why)`.
    fn broken_links(root: &Path, file: &Path) -> Vec<String> {
        let name = file
            .strip_prefix(root)
            .unwrap_or(file)
            .display()
            .to_string();
        let Ok(text) = fs::read_to_string(file) else {
            return vec![format!("{name}: missing or unreadable")];
        };
        let dir = file.parent().unwrap_or(root);
        let mut broken = Vec::new();
        for (line_no, line) in outside_fences(&text) {
            for target in link_targets(&strip_code_spans(line)) {
                if target.starts_with("http://")
                    || target.starts_with("https://")
                    || target.starts_with("mailto:")
                {
                    continue;
                }
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let path = percent_decode(path);
                let resolved = if path.is_empty() {
                    file.to_path_buf()
                } else if let Some(abs) = path.strip_prefix('/') {
                    root.join(abs)
                } else {
                    dir.join(&path)
                };
                let why = if target.is_empty() {
                    Some("empty target".to_string())
                } else if !resolved.exists() {
                    Some(format!("no file {}", resolved.display()))
                } else if let Some(anchor) = anchor {
                    let anchor = percent_decode(anchor).to_lowercase();
                    match fs::read_to_string(&resolved) {
                        Ok(t) if resolved.extension().is_some_and(|e| e == "md") => {
                            let found = anchors(&t);
                            (!found.contains(&anchor))
                                .then(|| format!("no heading with anchor #{anchor}"))
                        }
                        _ => Some("an anchor into a file that is not Markdown".to_string()),
                    }
                } else {
                    None
                };
                if let Some(why) = why {
                    broken.push(format!("{name}:{line_no}: ({target}): {why}"));
                }
            }
        }
        broken
    }

    #[test]
    fn readme_is_small_and_every_markdown_link_resolves() {
        let root = root();
        let readme = fs::metadata(root.join("README.md")).expect("README.md exists");
        assert!(
            readme.len() as usize <= README_MAX,
            "README.md is {} bytes, over the limit of {README_MAX}: move detail into docs/",
            readme.len()
        );
        let files = markdown_files(&root);
        assert!(files.len() >= FILES.len());
        let broken: Vec<String> = files.iter().flat_map(|f| broken_links(&root, f)).collect();
        assert!(
            broken.is_empty(),
            "{} broken Markdown link(s):\n{}",
            broken.len(),
            broken.join("\n")
        );
    }

    #[test]
    fn the_link_check_finds_broken_links() {
        let dir = std::env::temp_dir().join(format!("nvcim-docs-check-{}", std::process::id()));
        fs::create_dir_all(dir.join("docs")).unwrap();
        fs::write(
            dir.join("docs/a.md"),
            "# A title: `code`, and more!\n\n## Repeat\n\n## Repeat\n\n\
             [ok](a.md#a-title-code-and-more) [ok](#repeat-1) ![img](../b.md) [ok](<../b.md>)\n\
             [bad](missing.md) [bad](#nowhere) `[not a link](x.md)`\n\
             ```\n[not a link](y.md)\n```\n[ref]: ../c.md\n[web](https://example.com/x)\n",
        )
        .unwrap();
        fs::write(
            dir.join("b.md"),
            "# B\n[bad](docs/a.md#repeat-2) [ok](docs/a.md#repeat)\n",
        )
        .unwrap();
        let found: Vec<String> = [dir.join("docs/a.md"), dir.join("b.md")]
            .iter()
            .flat_map(|f| broken_links(&dir, f))
            .collect();
        fs::remove_dir_all(&dir).unwrap();
        let mut targets: Vec<&str> = found
            .iter()
            .map(|b| b.split(['(', ')']).nth(1).unwrap())
            .collect();
        targets.sort_unstable();
        assert_eq!(
            targets,
            ["#nowhere", "../c.md", "docs/a.md#repeat-2", "missing.md"],
            "{found:#?}"
        );
        assert_eq!(
            slug("Tables III, IV and V at CPU scale"),
            "tables-iii-iv-and-v-at-cpu-scale"
        );
        assert_eq!(
            slug("The `--sigma-unit` and σ ± 1"),
            "the---sigma-unit-and-σ--1"
        );
    }
}
