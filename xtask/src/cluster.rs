//! `cargo xtask cluster-test`: `nvcim sweep --emit slurm` on a real one-node Slurm cluster.
//!
//! The step writes a `slurm.conf` for this machine alone into a temporary directory (localhost,
//! no cgroups: `proctrack/linuxproc`, `task/none`, free ports), starts `munged`, `slurmctld` and
//! `slurmd` as its own child processes, waits (bounded) until `sinfo` shows the node idle, and
//! then:
//!
//! 1. runs a tiny plan (noise and nft x sigma 0.2 and 0.4, width 0.125, 3 epochs on 800
//!    Fashion-MNIST images, 300 held out) with `nvcim sweep --jobs 2` on this machine, as the reference;
//! 2. writes the same plan's scripts with `nvcim sweep --emit slurm`, submits them with the
//!    generated `submit.sh` (the array, and the merge job with `afterany` on it), waits for both
//!    (bounded), checks that every task and the merge job COMPLETED with exit code 0, and that
//!    every cell's per-run accuracies and per-epoch metrics, and the merged tables, equal the
//!    local run's;
//! 3. checks that exit codes propagate: an array task for a cell the plan lacks ends FAILED, and
//!    a merge job over a sweep with a missing cell ends FAILED naming it;
//! 4. deletes one cell, resubmits its array task, `scancel`s it once its first checkpoint is on
//!    disk (mid-training), resubmits it, and checks that it resumed from that checkpoint and
//!    ended with the reference's numbers.
//!
//! Daemons, jobs and files are removed on every exit path: on success, on failure (the guard's
//! `Drop`) and on Ctrl-C (a handler that runs the same teardown); the step then checks that no
//! process of its cluster is left and fails if one was.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

/// The client and daemon programs the step needs (Debian: `slurm-wlm`, `munge`).
const PROGRAMS: [&str; 9] = [
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "sinfo",
    "scontrol",
    "scancel",
    "bash",
];

/// The plan both sweeps run.
const PLAN: &str = r#"name = "cluster-test"
datasets = ["fashion-mnist"]
data_dir = "/usr/share/datasets/fashion-mnist"
models = ["vgg8"]
width = 0.125
methods = ["noise", "nft"]
train_sigmas = [0.2, 0.4]
alphas = [0.1]
seeds = [0]
epochs = 3
train_args = ["--max-train", "800", "--val-fraction", "0.005", "--batch-size", "32", "--mc-val", "2", "--quiet"]

[eval]
sigmas = [0.4]
mc = 4
test_subset = 300

[slurm]
cpus_per_task = 1
time = "00:10:00"
"#;

/// Bounds of the waits.
const NODE_IDLE: Duration = Duration::from_secs(60);
const JOBS_DONE: Duration = Duration::from_secs(240);

/// What the teardown needs; kept in a global so the Ctrl-C handler can run it too.
struct Teardown {
    dir: PathBuf,
    conf: PathBuf,
    daemons: Vec<(String, Child)>,
}

static TEARDOWN: Mutex<Option<Teardown>> = Mutex::new(None);

/// The running cluster; dropping it tears everything down.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = teardown() {
            eprintln!("cluster-test: teardown: {e:#}");
        }
    }
}

/// Stops jobs and daemons, removes the directory, and checks that no process of the cluster is
/// left (killing and naming any that is).
fn teardown() -> Result<()> {
    let Some(mut t) = TEARDOWN.lock().map(|mut g| g.take()).unwrap_or(None) else {
        return Ok(());
    };
    // Jobs first, while the controller can still cancel them.
    let _ = client(&t.conf, "scancel", &["--user", &whoami()]).output();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        match client(&t.conf, "squeue", &["-h", "-o", "%i"]).output() {
            Ok(o) if o.status.success() && o.stdout.trim_ascii().is_empty() => break,
            Ok(o) if o.status.success() => std::thread::sleep(Duration::from_millis(200)),
            _ => break,
        }
    }
    // Then the daemons, newest first: SIGTERM, and SIGKILL after 10 s.
    for (name, child) in t.daemons.iter_mut().rev() {
        terminate(child, name);
    }
    let leftovers = kill_leftovers(&t.dir);
    let removed = fs::remove_dir_all(&t.dir);
    ensure!(
        leftovers.is_empty(),
        "processes of the test cluster were still running after its daemons stopped (killed now): {}",
        leftovers.join("; ")
    );
    removed.with_context(|| format!("removing {}", t.dir.display()))?;
    Ok(())
}

fn terminate(child: &mut Child, name: &str) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("cluster-test: {name} ignored SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills every process whose command line or environment mentions `dir` (job steps, nvcim
/// processes, daemons of this cluster) and returns their descriptions.
fn kill_leftovers(dir: &Path) -> Vec<String> {
    let me = std::process::id();
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let environ = fs::read(e.path().join("environ")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let ours = text.contains(&needle) || String::from_utf8_lossy(&environ).contains(&needle);
        // Zombies have no command line; they are reaped by their parents.
        if ours && !text.trim().is_empty() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            found.push(format!("pid {pid}: {}", text.trim()));
        }
    }
    found
}

fn whoami() -> String {
    Command::new("id")
        .arg("-un")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "root".into())
}

/// A Slurm client command against this cluster's configuration.
fn client(conf: &Path, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).env("SLURM_CONF", conf);
    c
}

/// Runs a client command; fails with its output.
fn run_client(conf: &Path, program: &str, args: &[&str]) -> Result<String> {
    let o = client(conf, program, args)
        .output()
        .with_context(|| format!("starting {program}"))?;
    ensure!(
        o.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .context("finding a free port")?
        .local_addr()?
        .port())
}

fn short_hostname() -> Result<String> {
    let o = Command::new("hostname")
        .arg("-s")
        .output()
        .context("running hostname")?;
    let h = String::from_utf8_lossy(&o.stdout).trim().to_string();
    ensure!(!h.is_empty(), "`hostname -s` printed nothing");
    Ok(h)
}

fn missing_programs() -> Vec<&'static str> {
    PROGRAMS
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {p}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect()
}

impl Cluster {
    /// Writes the configuration and starts the three daemons; waits for the node to be idle.
    fn start(dir: &Path) -> Result<Cluster> {
        let dir = dir.to_path_buf();
        for sub in ["state", "spool", "log", "munge"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        // munged insists on a socket directory others can traverse, and on a private key.
        set_mode(&dir, 0o755)?;
        set_mode(&dir.join("munge"), 0o755)?;
        let key = dir.join("munge").join("munge.key");
        let mut bytes = vec![0u8; 1024];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .context("reading /dev/urandom for the munge key")?;
        fs::write(&key, &bytes).with_context(|| format!("writing {}", key.display()))?;
        set_mode(&key, 0o400)?;
        let host = short_hostname()?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (ctld_port, d_port) = (free_port()?, free_port()?);
        let d = dir.display();
        let user = whoami();
        let conf = dir.join("slurm.conf");
        let text = format!(
            "# One-node test cluster of `cargo xtask cluster-test`.\n\
             ClusterName=nvcimtest\n\
             SlurmctldHost={host}(127.0.0.1)\n\
             SlurmUser={user}\n\
             SlurmdUser={user}\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={d}/munge/munge.socket\n\
             StateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool\n\
             SlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldPort={ctld_port}\n\
             SlurmdPort={d_port}\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\n\
             SchedulerType=sched/backfill\n\
             MpiDefault=none\n\
             ReturnToService=2\n\
             MinJobAge=600\n\
             SlurmctldLogFile={d}/log/slurmctld.log\n\
             SlurmdLogFile={d}/log/slurmd.log\n\
             NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n\
             PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP\n"
        );
        fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
        *TEARDOWN
            .lock()
            .expect("no panic while holding the teardown lock") = Some(Teardown {
            dir: dir.clone(),
            conf: conf.clone(),
            daemons: Vec::new(),
        });
        let cluster = Cluster {
            dir: dir.clone(),
            conf: conf.clone(),
        };
        let munge = dir.join("munge");
        let m = munge.display();
        cluster.spawn(
            "munged",
            &[
                "-F",
                &format!("--socket={m}/munge.socket"),
                &format!("--key-file={m}/munge.key"),
                &format!("--pid-file={m}/munged.pid"),
                &format!("--log-file={d}/log/munged.log"),
                &format!("--seed-file={m}/munge.seed"),
            ],
        )?;
        wait_for(Duration::from_secs(10), "munged's socket", || {
            Ok(munge.join("munge.socket").exists())
        })
        .map_err(|e| cluster.with_logs(e))?;
        let c = conf.display().to_string();
        cluster.spawn("slurmctld", &["-D", "-f", &c])?;
        cluster.spawn("slurmd", &["-D", "-f", &c, "-N", &host])?;
        wait_for(NODE_IDLE, "the node to be idle in sinfo", || {
            let o = client(&conf, "sinfo", &["-h", "-N", "-o", "%T"]).output()?;
            Ok(o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "idle")
        })
        .map_err(|e| cluster.with_logs(e))?;
        Ok(cluster)
    }

    fn spawn(&self, program: &str, args: &[&str]) -> Result<()> {
        let log = self.dir.join("log").join(format!("{program}.out"));
        let f = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let mut g = TEARDOWN
            .lock()
            .expect("no panic while holding the teardown lock");
        g.as_mut()
            .expect("the teardown is registered before daemons start")
            .daemons
            .push((program.to_string(), child));
        Ok(())
    }

    /// `e` with the tails of the daemons' logs, for a start that failed.
    fn with_logs(&self, e: anyhow::Error) -> anyhow::Error {
        let mut s = String::new();
        for f in [
            "munged.out",
            "munged.log",
            "slurmctld.out",
            "slurmctld.log",
            "slurmd.out",
            "slurmd.log",
        ] {
            if let Ok(t) = fs::read_to_string(self.dir.join("log").join(f)) {
                let tail: Vec<&str> = t.lines().rev().take(8).collect();
                s += &format!(
                    "\n--- {f}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        e.context(format!(
            "the one-node Slurm cluster did not start here; its logs:{s}"
        ))
    }
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", p.display()))
}

fn wait_for(limit: Duration, what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if ready()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("gave up waiting for {what} after {} s", limit.as_secs())
}

/// One job's (or array task's) state and exit code, from `scontrol show job -o`.
#[derive(Debug, Clone, PartialEq)]
struct JobState {
    task: Option<String>,
    state: String,
    exit: String,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn job_states(conf: &Path, job: &str) -> Result<Vec<JobState>> {
    let text = run_client(conf, "scontrol", &["show", "job", "-o", job])?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| JobState {
            task: field(l, "ArrayTaskId").map(str::to_string),
            state: field(l, "JobState").unwrap_or("?").to_string(),
            exit: field(l, "ExitCode").unwrap_or("?").to_string(),
        })
        .collect())
}

/// Waits until none of `jobs` is pending or running.
fn wait_jobs(conf: &Path, jobs: &[&str]) -> Result<()> {
    let list = jobs.join(",");
    wait_for(JOBS_DONE, &format!("jobs {list} to end"), || {
        let o = client(conf, "squeue", &["-h", "-o", "%i %T", "-j", &list]).output()?;
        Ok(o.status.success() && o.stdout.trim_ascii().is_empty())
    })
}

/// Submits `script` with extra sbatch arguments; returns the job id.
fn sbatch(conf: &Path, args: &[&str]) -> Result<String> {
    let mut a = vec!["--parsable"];
    a.extend_from_slice(args);
    let id = run_client(conf, "sbatch", &a)?;
    Ok(id.trim().split(';').next().unwrap_or("").to_string())
}

fn expect_states(conf: &Path, job: &str, want: &str, what: &str) -> Result<Vec<JobState>> {
    let states = job_states(conf, job)?;
    ensure!(
        !states.is_empty(),
        "{what}: job {job} is unknown to slurmctld"
    );
    for s in &states {
        ensure!(
            s.state == want,
            "{what}: job {job}{} ended {} (exit code {}), expected {want}",
            s.task.as_deref().map_or(String::new(), |t| format!("_{t}")),
            s.state,
            s.exit
        );
    }
    Ok(states)
}

/// A cell's numbers: the per-run accuracies and clean accuracy of its `eval.json`, and its
/// `metrics.jsonl` without the wall-clock fields.
fn cell_numbers(cell: &Path) -> Result<(serde_json::Value, Vec<serde_json::Value>)> {
    let p = cell.join("eval").join("eval.json");
    let eval: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
    )
    .with_context(|| format!("parsing {}", p.display()))?;
    let runs = serde_json::json!({
        "clean": eval["clean_accuracy"],
        "runs": eval["results"].as_array().map(|r| r.iter().map(|x| x["accuracies"].clone()).collect::<Vec<_>>()),
    });
    let m = cell.join("train").join("metrics.jsonl");
    let metrics = fs::read_to_string(&m)
        .with_context(|| format!("reading {}", m.display()))?
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l)?;
            if let Some(o) = v.as_object_mut() {
                o.remove("seconds");
                o.remove("images_per_s");
            }
            Ok(v)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((runs, metrics))
}

fn cell_dirs(out: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(out)
        .with_context(|| format!("listing {}", out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("eval").is_dir() || p.join("train").is_dir())
        .collect();
    v.sort();
    Ok(v)
}

fn same_cell(local: &Path, slurm: &Path, what: &str) -> Result<()> {
    let (a, b) = (cell_numbers(local)?, cell_numbers(slurm)?);
    ensure!(
        a.0 == b.0,
        "{what}: {} evaluated differently on the cluster: local {} vs slurm {}",
        slurm.display(),
        a.0,
        b.0
    );
    ensure!(
        a.1 == b.1,
        "{what}: {} trained differently on the cluster (metrics.jsonl)",
        slurm.display()
    );
    Ok(())
}

/// Runs the step.
pub fn run(root: &Path, nvcim: &Path) -> Result<()> {
    let t = Instant::now();
    eprintln!("\n==> cluster test (one-node Slurm cluster)");
    let missing = missing_programs();
    if !missing.is_empty() {
        bail!(
            "Slurm cannot start here: {} not found. `cargo xtask setup` installs Debian's \
             slurm-wlm and munge (as root: apt-get install slurm-wlm munge)",
            missing.join(", ")
        );
    }
    ensure!(
        nvcim.is_file(),
        "{} is missing; build it first (cargo {})",
        nvcim.display(),
        crate::BUILD.join(" ")
    );
    ctrlc::set_handler(|| {
        eprintln!("\ncluster-test: interrupted; stopping the test cluster");
        if let Err(e) = teardown() {
            eprintln!("cluster-test: teardown: {e:#}");
        }
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    let base = std::env::temp_dir().join(format!("nvcim-cluster-{}", std::process::id()));
    if base.exists() {
        fs::remove_dir_all(&base).with_context(|| format!("removing {}", base.display()))?;
    }
    fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let cluster = Cluster::start(&base)?;
    eprintln!(
        "    cluster up in {:.1} s ({})",
        t.elapsed().as_secs_f64(),
        base.display()
    );
    let result = exercise(root, nvcim, &cluster);
    // The teardown's own verdict (daemons stopped, no process left, files removed); the
    // guard's `Drop` finds nothing left to do.
    let down = teardown();
    drop(cluster);
    if let Err(e) = &result {
        eprintln!("    cluster test failed; the cluster was stopped and its files removed");
        if let Err(d) = &down {
            eprintln!("    teardown: {d:#}");
        }
        bail!("{e:#}");
    }
    down?;
    eprintln!(
        "<== cluster test: passed in {:.1} s; daemons stopped, no process left",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn exercise(_root: &Path, nvcim: &Path, cluster: &Cluster) -> Result<()> {
    let conf = cluster.conf.as_path();
    let base = cluster.dir.as_path();
    let plan = base.join("plan.toml");
    fs::write(&plan, PLAN).with_context(|| format!("writing {}", plan.display()))?;
    let (local, slurm) = (base.join("local"), base.join("slurm"));
    let nv = |args: &[&str]| -> Result<String> {
        let o = Command::new(nvcim)
            .args(args)
            .output()
            .with_context(|| format!("starting {}", nvcim.display()))?;
        ensure!(
            o.status.success(),
            "`nvcim {}` failed ({}): {}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let p = plan.to_str().context("a UTF-8 temp path")?;
    let (l, s) = (
        local.to_str().context("a UTF-8 temp path")?,
        slurm.to_str().context("a UTF-8 temp path")?,
    );

    // 1. The reference, on this machine.
    let t = Instant::now();
    nv(&["sweep", p, "--out", l, "--jobs", "2"])?;
    nv(&["sweep", p, "--out", l, "--merge"])?;
    eprintln!("    local sweep: {:.1} s", t.elapsed().as_secs_f64());

    // 2. The same plan through sbatch.
    let t = Instant::now();
    nv(&["sweep", p, "--out", s, "--emit", "slurm"])?;
    let submit = slurm.join("submit.sh");
    let o = client(conf, "bash", &[submit.to_str().context("a UTF-8 path")?])
        .output()
        .context("running submit.sh")?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        o.status.success(),
        "submit.sh failed: {text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |w: &str| {
        words
            .iter()
            .position(|x| *x == w)
            .and_then(|i| words.get(i + 1))
            .map(|s| s.to_string())
    };
    let (array, merge) = match (after("job"), text.rsplit("merge job ").next()) {
        (Some(a), Some(m)) => (a, m.split_whitespace().next().unwrap_or("").to_string()),
        _ => bail!("submit.sh printed no job ids: {text}"),
    };
    wait_jobs(conf, &[&array, &merge])?;
    let tasks = expect_states(conf, &array, "COMPLETED", "the array")?;
    ensure!(
        tasks.len() == 4,
        "the array ran {} tasks, not 4",
        tasks.len()
    );
    ensure!(
        tasks.iter().all(|t| t.exit == "0:0"),
        "array exit codes: {tasks:?}"
    );
    expect_states(conf, &merge, "COMPLETED", "the merge job")?;
    let cells = cell_dirs(&local)?;
    ensure!(
        cells.len() == 4,
        "the local sweep made {} cells",
        cells.len()
    );
    for c in &cells {
        let name = c.file_name().context("a cell name")?;
        same_cell(c, &slurm.join(name), "array")?;
        let logs = fs::read_dir(slurm.join("logs"))?.count();
        ensure!(logs >= 5, "{logs} Slurm logs in {}/logs", slurm.display());
    }
    for table in ["report.md", "table2.csv"] {
        let (a, b) = (
            fs::read_to_string(local.join("report").join(table)),
            fs::read_to_string(slurm.join("report").join(table)),
        );
        match (a, b) {
            (Ok(a), Ok(b)) => ensure!(a == b, "the merged {table} differs from the local one"),
            (Err(_), Err(_)) => {}
            (a, b) => bail!(
                "{table}: local {} / slurm {}",
                if a.is_ok() { "present" } else { "missing" },
                if b.is_ok() { "present" } else { "missing" }
            ),
        }
    }
    eprintln!(
        "    slurm sweep (array {array}, merge {merge}): 4 cells equal to the local run, {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // 3. Exit codes: a task for a cell the plan lacks fails; so does a merge with a missing cell.
    let script = slurm.join("sweep.sbatch");
    let sc = script.to_str().context("a UTF-8 path")?;
    let bad = sbatch(conf, &["--array=7", sc])?;
    wait_jobs(conf, &[&bad])?;
    let st = expect_states(conf, &bad, "FAILED", "a task for cell 7 of 4")?;
    ensure!(
        st[0].exit.starts_with('1'),
        "cell 7's exit code {}",
        st[0].exit
    );
    // The plan's cell 0 (array task 0), by its name in the dry run's listing.
    let listing = nv(&["sweep", p, "--out", s, "--dry-run"])?;
    let victim: std::ffi::OsString = listing
        .lines()
        .find_map(|l| l.strip_prefix("[0] ")?.split(' ').next())
        .context("the dry run lists no cell 0")?
        .into();
    let reference = local.join(&victim);
    let victim_dir = slurm.join(&victim);
    fs::remove_dir_all(&victim_dir)
        .with_context(|| format!("removing {}", victim_dir.display()))?;
    let merge_script = slurm.join("merge.sbatch");
    let ms = merge_script.to_str().context("a UTF-8 path")?;
    let m2 = sbatch(conf, &[ms])?;
    wait_jobs(conf, &[&m2])?;
    expect_states(conf, &m2, "FAILED", "a merge with a missing cell")?;
    let merge_log = fs::read_dir(slurm.join("logs"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(&format!("-{m2}.out")))
        .context("the second merge job's log")?;
    let log = fs::read_to_string(&merge_log)?;
    ensure!(
        log.contains(&format!("[0] {}", victim.to_string_lossy())),
        "the merge log does not name the missing cell: {log}"
    );
    eprintln!(
        "    exit codes: a bad task FAILED ({bad}), a merge missing a cell FAILED ({m2}) naming it"
    );

    // 4. scancel mid-training, resubmit, resume.
    let t = Instant::now();
    let j1 = sbatch(conf, &["--array=0", sc])?;
    let state = victim_dir.join("train/checkpoint/state.json");
    wait_for(JOBS_DONE, "the first checkpoint of cell 0", || {
        Ok(fs::read_to_string(&state).is_ok_and(|t| t.contains("\"epochs_done\": 1")))
    })?;
    run_client(conf, "scancel", &[&j1])?;
    wait_jobs(conf, &[&j1])?;
    expect_states(conf, &j1, "CANCELLED", "the cancelled task")?;
    ensure!(
        !victim_dir.join("eval/eval.json").exists() && state.is_file(),
        "cell 0 was not cut mid-training by scancel (it finished first or left no checkpoint)"
    );
    let done: serde_json::Value = serde_json::from_str(&fs::read_to_string(&state)?)?;
    let epochs_at_cancel = done["epochs_done"].as_u64().unwrap_or(0);
    ensure!(
        epochs_at_cancel < 3,
        "cell 0 finished training before the cancel"
    );
    let j2 = sbatch(conf, &["--array=0", sc])?;
    wait_jobs(conf, &[&j2])?;
    expect_states(conf, &j2, "COMPLETED", "the resubmitted task")?;
    let train_log = fs::read_to_string(victim_dir.join("train.log"))?;
    ensure!(
        train_log.contains("resuming from"),
        "the resubmitted task did not resume from its checkpoint: {train_log}"
    );
    same_cell(&reference, &victim_dir, "resumed after scancel")?;
    nv(&["sweep", p, "--out", s, "--merge"])?;
    eprintln!(
        "    scancel after epoch {epochs_at_cancel} ({j1}), resubmitted ({j2}): resumed, same numbers, {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
