//! The deploy files agree with each other, with the Dockerfile and with the config they ship:
//! ports, probes, mounts, the user, the Redis host and the load balancer's upstreams; and each
//! shipped `proxy.toml` loads with the proxy's own loader. Files only: no network, no ports.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use egain_proxy::Config;
use serde::Deserialize;
use serde_yaml_ng::Value;

const K8S: &str = "deploy/kubernetes";
const COMPOSE: &str = "deploy/compose.yaml";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a (multi-document) YAML file, aliases and `<<` merges applied.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let mut value =
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        value
            .apply_merge()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if !value.is_null() {
            docs.push(value);
        }
    }
    docs
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    out.sort();
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: expected a list, found {v:?}"))
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    seq(v, what)
        .iter()
        .map(|s| str_of(s, what).to_owned())
        .collect()
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (str_of(k, "label").to_owned(), str_of(v, "label").to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, pod: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod.get(k) == Some(v))
}

/// `run --config PATH` as the image's entrypoint takes it.
fn config_arg(args: &[String], what: &str) -> String {
    match args {
        [run, flag, path] if run == "run" && flag == "--config" => path.clone(),
        _ => panic!("{what}: expected [run, --config, PATH], found {args:?}"),
    }
}

/// `"32Mi"`, `"1Gi"`, `"64M"` in bytes.
fn quantity(v: &Value, what: &str) -> u64 {
    let s = str_of(v, what);
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("{what}: {s:?}"));
    let factor = match unit {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => panic!("{what}: unknown unit in {s:?}"),
    };
    n * factor
}

/// What the Dockerfile promises: exposed ports and the numeric user.
struct Image {
    expose: BTreeSet<u16>,
    uid: u64,
    gid: Option<u64>,
    entrypoint: String,
}

fn image() -> Image {
    let text = read(&root().join("Dockerfile"));
    let (mut expose, mut user, mut entrypoint) = (BTreeSet::new(), None, String::new());
    for line in text.lines().map(str::trim) {
        if let Some(ports) = line.strip_prefix("EXPOSE ") {
            for p in ports.split_whitespace() {
                let p = p.trim_end_matches("/tcp");
                expose.insert(p.parse().unwrap_or_else(|_| panic!("EXPOSE {p}")));
            }
        } else if let Some(u) = line.strip_prefix("USER ") {
            user = Some(u.trim().to_owned());
        } else if let Some(e) = line.strip_prefix("ENTRYPOINT ") {
            entrypoint = e.to_owned();
        }
    }
    let user = user.expect("the Dockerfile sets USER");
    let (uid, gid) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user.as_str(), None),
    };
    let numeric = |s: &str| -> u64 {
        s.parse()
            .unwrap_or_else(|_| panic!("Dockerfile USER {user}: must be numeric for runAsNonRoot"))
    };
    Image {
        expose,
        uid: numeric(uid),
        gid: gid.map(numeric),
        entrypoint,
    }
}

/// A shipped `proxy.toml`, loaded by the proxy's own loader.
struct Shipped {
    config: Config,
    /// The one directory every `*_file` path in the config lives in.
    secret_dir: String,
    /// The file names in that directory.
    secret_files: BTreeSet<String>,
    /// `[token_cache].redis` as (host, port).
    redis: (String, u16),
}

impl Shipped {
    fn listen_port(&self) -> u16 {
        match self.config.server.listen.as_slice() {
            [one] => one.port(),
            more => panic!("expected one listen address, found {more:?}"),
        }
    }

    fn admin(&self) -> SocketAddr {
        self.config
            .admin
            .as_ref()
            .expect("an [admin] listener")
            .listen
    }
}

fn file_keys(value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                match v {
                    toml::Value::String(s) if k.ends_with("_file") => out.push(s.clone()),
                    _ => file_keys(v, out),
                }
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| file_keys(v, out)),
        _ => {}
    }
}

/// `redis://[user:pass@]host[:port][/db]` -> (host, port).
fn redis_host(url: &str) -> (String, u16) {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .unwrap_or_else(|| panic!("{url}: not a redis URL"));
    let authority = rest.split('/').next().unwrap_or_default();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().expect("redis port")),
        None => (hostport.to_owned(), 6379),
    }
}

/// Loads `path` as the proxy would, with its secret files stood in for by files in a temporary
/// directory (a copy of the config whose secret directory is rewritten to that one).
fn load_shipped(path: &Path) -> Shipped {
    let text = read(path);
    let raw: toml::Value = text
        .parse::<toml::Table>()
        .map(toml::Value::Table)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut files = Vec::new();
    file_keys(&raw, &mut files);
    assert!(!files.is_empty(), "{}: no *_file paths", path.display());
    let dirs: BTreeSet<String> = files
        .iter()
        .map(|f| {
            let p = Path::new(f);
            assert!(p.is_absolute(), "{f}: secret paths must be absolute");
            p.parent().expect("a parent").display().to_string()
        })
        .collect();
    let [secret_dir] = <[String; 1]>::try_from(dirs.into_iter().collect::<Vec<_>>())
        .unwrap_or_else(|d| panic!("{}: secrets in several directories {d:?}", path.display()));
    let secret_files: BTreeSet<String> = files
        .iter()
        .map(|f| {
            Path::new(f)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();

    let tmp = tempfile::tempdir().expect("tempdir");
    for name in &secret_files {
        // 32 bytes: a raw cache key, and as good a client secret as any.
        std::fs::write(tmp.path().join(name), "0123456789abcdef0123456789abcdef").unwrap();
    }
    let copy = text.replace(
        &format!("{secret_dir}/"),
        &format!("{}/", tmp.path().display()),
    );
    let copy_path = tmp.path().join("proxy.toml");
    std::fs::write(&copy_path, copy).unwrap();
    let config = Config::load(&copy_path)
        .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));

    let redis = raw
        .get("token_cache")
        .and_then(|c| c.get("redis"))
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("{}: no [token_cache].redis", path.display()));
    Shipped {
        config,
        secret_dir,
        secret_files,
        redis: redis_host(redis),
    }
}

/// All Kubernetes objects in `deploy/kubernetes`, with the file each came from.
fn k8s_objects() -> Vec<(String, Value)> {
    let mut files = Vec::new();
    yaml_files(&root().join(K8S), &mut files);
    let mut out = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for doc in yaml_docs(&file) {
            out.push((name.clone(), doc));
        }
    }
    out
}

fn object<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| {
            o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name)
        })
        .collect();
    match found.as_slice() {
        [one] => one,
        _ => panic!("expected one {kind} {name:?}, found {}", found.len()),
    }
}

fn of_kind<'a>(objects: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"].as_str() == Some(kind))
        .collect()
}

/// A container port given by number or by name.
fn container_port(container: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).expect("a port number");
    }
    let name = str_of(port, "port");
    seq(&container["ports"], "ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .map(|n| u16::try_from(n).expect("a port number"))
        .unwrap_or_else(|| panic!("no container port named {name:?}"))
}

fn duration(v: &Value, what: &str) -> Duration {
    let s = str_of(v, what);
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("{what}: {s:?}: {e}"))
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut files = Vec::new();
    yaml_files(&root().join("deploy"), &mut files);
    assert!(files.len() >= 6, "deploy files missing: {files:?}");
    for file in &files {
        assert!(!yaml_docs(file).is_empty(), "{}: empty", file.display());
    }
    for (file, o) in k8s_objects() {
        if file == "kustomization.yaml" {
            continue;
        }
        for key in ["apiVersion", "kind"] {
            str_of(&o[key], &format!("{file}: {key}"));
        }
        str_of(&o["metadata"]["name"], &format!("{file}: metadata.name"));
    }
}

#[test]
fn kubernetes_deployment_agrees_with_its_config_and_the_image() {
    let shipped = load_shipped(&root().join(K8S).join("proxy.toml"));
    let image = image();
    let objects = k8s_objects();
    let deployment = object(&objects, "Deployment", "egain-proxy");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(3));
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = seq(&pod["containers"], "containers");
    let container = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("egain-proxy"))
        .expect("a container named egain-proxy");

    // The image's entrypoint is the binary; the manifest passes only its arguments.
    assert!(
        image.entrypoint.contains("egain-proxy"),
        "{}",
        image.entrypoint
    );
    assert!(
        container["command"].is_null(),
        "command would replace the entrypoint"
    );
    let config_path = config_arg(&strings(&container["args"], "args"), "args");

    // Listeners: reachable from the kubelet and the Service, and the ports the image exposes.
    let (listen, admin) = (shipped.listen_port(), shipped.admin());
    assert!(shipped.config.server.listen[0].ip().is_unspecified());
    assert!(admin.ip().is_unspecified(), "the kubelet probes the pod IP");
    let ports: BTreeSet<u16> = seq(&container["ports"], "ports")
        .iter()
        .map(|p| container_port(container, &p["containerPort"]))
        .collect();
    assert_eq!(ports, BTreeSet::from([listen, admin.port()]));
    assert_eq!(ports, image.expose, "Dockerfile EXPOSE");

    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            container_port(container, &get["port"]),
            admin.port(),
            "{probe}"
        );
    }

    // Mounts: the ConfigMap where --config points, the Secret where the config's files are.
    let volumes = seq(&pod["volumes"], "volumes");
    let volume = move |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name:?}"))
    };
    let mounts = seq(&container["volumeMounts"], "volumeMounts");
    let mount_of = move |key: &str| {
        let found: Vec<(&Value, &Value)> = mounts
            .iter()
            .map(|m| (m, volume(str_of(&m["name"], "volumeMounts.name"))))
            .filter(|(_, v)| !v[key].is_null())
            .collect();
        match found.as_slice() {
            [one] => *one,
            _ => panic!("expected one {key} volume mount, found {}", found.len()),
        }
    };
    let (config_mount, config_volume) = mount_of("configMap");
    let config_path = Path::new(&config_path);
    assert_eq!(
        config_mount["mountPath"].as_str(),
        config_path.parent().and_then(Path::to_str)
    );
    assert!(
        config_mount["subPath"].is_null(),
        "subPath mounts never see updates"
    );
    let kustomization = yaml_docs(&root().join(K8S).join("kustomization.yaml"));
    let generator = seq(
        &kustomization[0]["configMapGenerator"],
        "configMapGenerator",
    )
    .iter()
    .find(|g| g["name"] == config_volume["configMap"]["name"])
    .expect("the ConfigMap is generated by kustomization.yaml");
    // A generated key is the file's name unless written `key=file`.
    let key = config_path.file_name().unwrap().to_str().unwrap();
    assert!(
        strings(&generator["files"], "files")
            .iter()
            .any(
                |f| (f == "proxy.toml" && key == "proxy.toml") || *f == format!("{key}=proxy.toml")
            ),
        "the ConfigMap holds {key} from proxy.toml"
    );

    let (secret_mount, secret_volume) = mount_of("secret");
    assert_eq!(
        secret_mount["mountPath"].as_str(),
        Some(shipped.secret_dir.as_str())
    );
    assert!(
        secret_mount["subPath"].is_null(),
        "subPath mounts never see rotations"
    );
    assert!(
        secret_volume["secret"]["items"].is_null(),
        "every key becomes a file"
    );
    for m in [config_mount, secret_mount] {
        assert_eq!(m["readOnly"].as_bool(), Some(true), "{:?}", m["name"]);
    }
    let secret_name = str_of(&secret_volume["secret"]["secretName"], "secretName");
    let example = object(&objects, "Secret", secret_name);
    let mut keys = BTreeSet::new();
    for field in ["stringData", "data"] {
        keys.extend(labels(&example[field]).into_keys());
    }
    assert_eq!(keys, shipped.secret_files, "secret.example.yaml's keys");

    // Security context: the image's numeric user, nothing writable, nothing to escalate to.
    let sc = &container["securityContext"];
    // Each key as the container sees it (its own setting, else the pod's); a setting at both
    // levels must agree, so neither hides a wrong value.
    let effective = |key: &str| {
        let (own, inherited) = (&sc[key], &pod["securityContext"][key]);
        if !own.is_null() && !inherited.is_null() {
            assert_eq!(
                own, inherited,
                "securityContext.{key}: pod and container differ"
            );
        }
        if own.is_null() {
            inherited.clone()
        } else {
            own.clone()
        }
    };
    assert_eq!(effective("runAsNonRoot").as_bool(), Some(true));
    assert_eq!(
        effective("runAsUser").as_u64(),
        Some(image.uid),
        "Dockerfile USER"
    );
    if let Some(gid) = image.gid {
        assert_eq!(
            effective("runAsGroup").as_u64(),
            Some(gid),
            "Dockerfile USER"
        );
    }
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(strings(&sc["capabilities"]["drop"], "drop").contains(&"ALL".to_owned()));

    // Shutdown: the preStop pause and the whole drain fit before the kubelet's SIGKILL.
    let pre_stop = &container["lifecycle"]["preStop"];
    let pause = if let Some(s) = pre_stop["sleep"]["seconds"].as_u64() {
        s
    } else if pre_stop["exec"].is_null() {
        0
    } else {
        match strings(&pre_stop["exec"]["command"], "preStop").as_slice() {
            [sleep, n] if sleep == "sleep" => n.parse().expect("sleep seconds"),
            other => panic!("preStop: expected [sleep, N], found {other:?}"),
        }
    };
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace)
            > shipped.config.server.shutdown_grace + Duration::from_secs(pause),
        "terminationGracePeriodSeconds {grace} <= shutdown_grace {:?} + preStop {pause}s",
        shipped.config.server.shutdown_grace
    );

    // Memory: requested and bounded, with the measurement it came from beside it.
    let resources = &container["resources"];
    let request = quantity(&resources["requests"]["memory"], "requests.memory");
    let limit = quantity(&resources["limits"]["memory"], "limits.memory");
    assert!(request <= limit, "requests.memory > limits.memory");
    assert!(
        read(&root().join(K8S).join("deployment.yaml")).contains("VmRSS"),
        "the measured RSS is noted beside the resources"
    );
}

#[test]
fn kubernetes_service_budget_redis_and_kustomization_fit_the_deployment() {
    let shipped = load_shipped(&root().join(K8S).join("proxy.toml"));
    let objects = k8s_objects();
    let deployment = object(&objects, "Deployment", "egain-proxy");
    let template = &deployment["spec"]["template"];
    let pod_labels = labels(&template["metadata"]["labels"]);
    let container = &template["spec"]["containers"][0];
    let admin = shipped.admin().port();

    // The Service carries the proxy's port, never the admin port.
    let services: Vec<&Value> = of_kind(&objects, "Service")
        .into_iter()
        .filter(|s| selects(&labels(&s["spec"]["selector"]), &pod_labels))
        .collect();
    assert_eq!(services.len(), 1, "one Service selects the proxy's pods");
    let targets: BTreeSet<u16> = seq(&services[0]["spec"]["ports"], "Service ports")
        .iter()
        .map(|p| container_port(container, &p["targetPort"]))
        .collect();
    assert_eq!(targets, BTreeSet::from([shipped.listen_port()]));
    assert!(!targets.contains(&admin));

    // The budget keeps at least two of three replicas through voluntary disruptions.
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
    let budgets: Vec<&Value> = of_kind(&objects, "PodDisruptionBudget")
        .into_iter()
        .filter(|b| selects(&labels(&b["spec"]["selector"]["matchLabels"]), &pod_labels))
        .collect();
    assert_eq!(
        budgets.len(),
        1,
        "one PodDisruptionBudget selects the proxy's pods"
    );
    let spec = &budgets[0]["spec"];
    let kept = match (
        spec["minAvailable"].as_u64(),
        spec["maxUnavailable"].as_u64(),
    ) {
        (Some(min), None) => min,
        (None, Some(max)) => replicas - max,
        other => panic!("set minAvailable or maxUnavailable as a number: {other:?}"),
    };
    assert!((2..replicas).contains(&kept), "keeps {kept} of {replicas}");

    // The Redis the config names is a Service here, on that port.
    let (host, port) = &shipped.redis;
    let redis = object(&objects, "Service", host);
    assert!(
        seq(&redis["spec"]["ports"], "Redis ports")
            .iter()
            .any(|p| p["port"].as_u64() == Some(u64::from(*port))),
        "Service {host} has no port {port}"
    );

    // `kubectl apply -k` takes every manifest except the example Secret.
    let kustomization = &yaml_docs(&root().join(K8S).join("kustomization.yaml"))[0];
    let resources: BTreeSet<String> = strings(&kustomization["resources"], "resources")
        .into_iter()
        .collect();
    let mut manifests = Vec::new();
    yaml_files(&root().join(K8S), &mut manifests);
    let expected: BTreeSet<String> = manifests
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|f| f != "kustomization.yaml" && f != "secret.example.yaml")
        .collect();
    assert_eq!(resources, expected, "kustomization.yaml resources");
}

/// Bind mounts of a compose service as (source relative to `deploy/`, target, read-only).
fn compose_mounts(service: &Value) -> Vec<(String, String, bool)> {
    let Some(volumes) = service["volumes"].as_sequence() else {
        return Vec::new();
    };
    volumes
        .iter()
        .map(|v| match v.as_str() {
            Some(short) => {
                let parts: Vec<&str> = short.split(':').collect();
                match parts.as_slice() {
                    [s, t] => (s.to_string(), t.to_string(), false),
                    [s, t, mode] => (
                        s.to_string(),
                        t.to_string(),
                        mode.split(',').any(|m| m == "ro"),
                    ),
                    _ => panic!("volume {short:?}"),
                }
            }
            None => (
                str_of(&v["source"], "volumes.source").to_owned(),
                str_of(&v["target"], "volumes.target").to_owned(),
                v["read_only"].as_bool() == Some(true),
            ),
        })
        .collect()
}

#[test]
fn compose_runs_three_proxies_redis_and_a_balancer_over_them() {
    let deploy = root().join("deploy");
    let compose = &yaml_docs(&root().join(COMPOSE))[0];
    let image = image();
    let services = compose["services"].as_mapping().expect("services");
    let services: BTreeMap<String, &Value> = services
        .iter()
        .map(|(k, v)| (str_of(k, "service name").to_owned(), v))
        .collect();

    // The proxies are the services built from the repo's Dockerfile.
    let built_here = |s: &Value| {
        let context = s["build"]["context"]
            .as_str()
            .or_else(|| s["build"].as_str());
        context.is_some_and(|c| deploy.join(c).canonicalize().ok() == root().canonicalize().ok())
            && s["build"]["dockerfile"].as_str().unwrap_or("Dockerfile") == "Dockerfile"
    };
    let proxies: Vec<(&String, &&Value)> = services.iter().filter(|(_, s)| built_here(s)).collect();
    let replicas: u64 = proxies
        .iter()
        .map(|(_, s)| s["deploy"]["replicas"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(
        replicas, 3,
        "three proxy replicas built from the Dockerfile"
    );

    let mut configs = BTreeSet::new();
    for (name, s) in &proxies {
        let config_path = config_arg(&strings(&s["command"], "command"), name);
        let mounts = compose_mounts(s);
        let (source, _, ro) = mounts
            .iter()
            .find(|(_, t, _)| *t == config_path)
            .unwrap_or_else(|| panic!("{name}: nothing mounted at {config_path}"));
        assert!(ro, "{name}: the config is mounted read-only");
        configs.insert(source.clone());
        assert!(
            s["ports"].is_null(),
            "{name}: reached through the load balancer only"
        );
        if let Some(user) = s["user"].as_str() {
            assert_eq!(user.split(':').next(), Some(image.uid.to_string().as_str()));
        }
    }
    let [config] = <[String; 1]>::try_from(configs.into_iter().collect::<Vec<_>>())
        .expect("every proxy replica runs the same config");
    let shipped = load_shipped(&deploy.join(config));
    let listen = shipped.listen_port();
    assert!(
        image.expose.contains(&listen),
        "Dockerfile EXPOSE has {listen}"
    );

    for (name, s) in &proxies {
        let secrets = compose_mounts(s)
            .into_iter()
            .find(|(_, t, _)| *t == shipped.secret_dir)
            .unwrap_or_else(|| panic!("{name}: no secrets at {}", shipped.secret_dir));
        assert!(secrets.2, "{name}: secrets are mounted read-only");
        let test = strings(&s["healthcheck"]["test"], "healthcheck.test").join(" ");
        let admin = shipped.admin().port().to_string();
        assert!(
            test.contains("/readyz") && test.contains(&admin),
            "{name}: the healthcheck asks /readyz on {admin}: {test}"
        );
        let stop = duration(&s["stop_grace_period"], "stop_grace_period");
        assert!(
            stop > shipped.config.server.shutdown_grace,
            "{name}: stop_grace_period"
        );
    }

    // Redis under the name the config's URL uses.
    let (host, _) = &shipped.redis;
    let redis = services
        .get(host)
        .unwrap_or_else(|| panic!("no service {host:?} for [token_cache].redis"));
    assert!(str_of(&redis["image"], "redis image").starts_with("redis:"));

    // The load balancer's upstreams are exactly the proxies on their listen port.
    let (lb_name, lb) = services
        .iter()
        .find(|(_, s)| {
            s["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("nginx") || i.starts_with("haproxy"))
        })
        .expect("an nginx or haproxy service");
    let mut upstreams = BTreeSet::new();
    for (source, _, _) in compose_mounts(lb) {
        let path = deploy.join(source);
        if !path.is_file() {
            continue;
        }
        for line in read(&path).lines() {
            let line = line.split('#').next().unwrap_or_default();
            let mut words = line.split_whitespace();
            if words.next() != Some("server") {
                continue;
            }
            for word in words {
                let word = word.trim_end_matches(';');
                if let Some((h, p)) = word.rsplit_once(':') {
                    if let Ok(p) = p.parse::<u16>() {
                        upstreams.insert((h.to_owned(), p));
                    }
                }
            }
        }
    }
    let expected: BTreeSet<(String, u16)> = proxies
        .iter()
        .map(|(name, _)| ((*name).clone(), listen))
        .collect();
    assert_eq!(upstreams, expected, "{lb_name}'s upstream servers");
}
