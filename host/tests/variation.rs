//! `nvcim variation`: the real binary on the example and on bad input.

use std::process::Command;

fn nvcim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nvcim"))
        .args(args)
        .output()
        .expect("running nvcim")
}

#[test]
fn paper_setting_reports_0_311_and_a_matching_empirical_std() {
    let out = nvcim(&[
        "variation",
        "--m",
        "8",
        "--n",
        "2",
        "--sigma",
        "0.4",
        "--unit",
        "range",
        "--samples",
        "1000000",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let row = &v["rows"][0];
    assert_eq!(row["unit"], "range");
    let analytic = row["analytic_std"].as_f64().unwrap();
    let empirical = row["empirical_std"].as_f64().unwrap();
    assert!((analytic - 0.311).abs() < 5e-4, "analytic {analytic}");
    assert!(
        (empirical / analytic - 1.0).abs() < 0.01,
        "empirical {empirical}"
    );
    assert!((row["sigma_other_unit"].as_f64().unwrap() - 1.2).abs() < 1e-6);
}

#[test]
fn level_convention_and_table_output() {
    let out = nvcim(&[
        "variation",
        "--sigma",
        "0.2,0.6",
        "--sigma-unit",
        "level",
        "--samples",
        "20000",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("level"), "{text}");
    // 0.2592 * 0.6 = 0.15552
    assert!(text.contains("0.1555"), "{text}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let cases: &[(&[&str], &str)] = &[
        (&["variation", "--m", "6", "--n", "4"], "--m 6 / --n 4"),
        (&["variation", "--m", "7"], "not supported"),
        (&["variation", "--sigma", "-0.1"], "--sigma"),
        (&["variation", "--sigma", "nan"], "--sigma"),
        (&["variation", "--sigma", ""], "at least one value"),
        (&["variation", "--stuck-low", "1.5"], "--stuck-low"),
        (
            &["variation", "--stuck-low", "0.6", "--stuck-high", "0.6"],
            "sum at most 1",
        ),
        (&["variation", "--samples", "0"], "--samples"),
    ];
    for (args, needle) in cases {
        let out = nvcim(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
