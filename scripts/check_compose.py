#!/usr/bin/env python3
"""Offline checks of the Docker Compose stack (compose/) and the images (Dockerfile,
compose/Dockerfile.cuda), run by scripts/check-compose.sh. Needs PyYAML; no Docker engine.

Each check prints one line: `ok`, `FAIL` (exit status 1), or `pending` for what the stack already
uses but gridwatch does not have yet (listed in PENDING below; a failure with --strict).
`--promql-out FILE` writes every dashboard query as a Prometheus rules file for `promtool check
rules` to parse.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
COMPOSE_CUDA_FILE = COMPOSE_DIR / "compose.cuda.yaml"
GRIDWATCH_TOML = COMPOSE_DIR / "gridwatch.toml"
EXAMPLE_TOML = ROOT / "examples" / "gridwatch.toml"
TELEMETRY_RS = ROOT / "src" / "telemetry.rs"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "gridwatch.json"
DATASOURCES = COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = COMPOSE_DIR / "grafana" / "provisioning" / "dashboards" / "gridwatch.yaml"
PROMETHEUS_YML = COMPOSE_DIR / "prometheus" / "prometheus.yml"
INIT_TOPICS = COMPOSE_DIR / "kafka" / "init-topics.sh"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERFILE_CUDA = COMPOSE_DIR / "Dockerfile.cuda"
DOCKERIGNORE = ROOT / ".dockerignore"

# What the stack would rely on before gridwatch has it: each entry is checked as soon as it
# exists (kind and labels against src/telemetry.rs, the key against examples/gridwatch.toml);
# until then it is reported as pending. Everything the stack uses exists today.
PENDING_METRICS: dict = {}  # name: (kind, labels)
PENDING_CONFIG_KEYS: set = set()
PENDING_FILES: set = set()

# The topics the stack creates, and what gridwatch and the simulator must agree with.
EXPECTED_TOPICS = {
    "readings": (6, {}),
    "spatial-nodes": (1, {"cleanup.policy": "compact"}),
    "anomalies": (6, {}),
    "gridwatch-dlq": (1, {}),
    "gridwatch-judge-state": (1, {"cleanup.policy": "compact"}),
}
EXPECTED_SERVICES = {"kafka", "init-topics", "simulator", "gridwatch", "prometheus", "grafana"}
ADMIN_PORT = 9464
MIN_RUST = (1, 88)

# Labels Prometheus adds or histogram/summary series carry.
IMPLICIT_LABELS = {"job", "instance", "le", "quantile"}


class Report:
    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.failures = 0
        self.pending = 0

    def ok(self, what: str) -> None:
        print(f"ok       {what}")

    def fail(self, what: str) -> None:
        self.failures += 1
        print(f"FAIL     {what}")

    def pend(self, what: str) -> None:
        self.pending += 1
        if self.strict:
            self.fail(f"(strict) {what}")
        else:
            print(f"pending  {what}")

    def check(self, cond: bool, what: str, detail: str = "") -> bool:
        if cond:
            self.ok(what)
        else:
            self.fail(f"{what}{': ' + detail if detail else ''}")
        return cond


def rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


# ── YAML with duplicate-key detection (Compose rejects duplicate keys; PyYAML would not) ─────


class UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)  # resolves `<<` merge keys first
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def load_yaml(r: Report, path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=UniqueKeyLoader)  # noqa: S506 (SafeLoader subclass)
    except FileNotFoundError:
        r.fail(f"{rel(path)} exists")
        return None
    except yaml.YAMLError as e:
        r.fail(f"{rel(path)} parses as YAML: {e}")
        return None
    r.ok(f"{rel(path)} parses as YAML")
    return data


# ── compose.yaml ─────────────────────────────────────────────────────────────────────────────


def strings_in(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings_in(k)
            yield from strings_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings_in(v)


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_of(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_compose_file(r: Report, path: Path, compose: dict, full: bool, label: str | None = None) -> None:
    base = path.parent
    name = label or rel(path)
    services = compose.get("services")
    if not isinstance(services, dict) or not services:
        r.fail(f"{name}: has services")
        return
    if full:
        r.check(
            set(services) == EXPECTED_SERVICES,
            f"{name}: services are {', '.join(sorted(EXPECTED_SERVICES))}",
            f"found {', '.join(sorted(services))}",
        )

    # Compose interpolates $VAR and ${VAR}; this stack needs no variables (a literal $ is $$).
    bad = [s for s in strings_in(compose) if re.search(r"\$(?!\$)", s.replace("$$", ""))]
    r.check(not bad, f"{name}: no variable interpolation needed", "; ".join(bad))

    declared_volumes = set((compose.get("volumes") or {}).keys())
    for sname, svc in services.items():
        where = f"{name}: service {sname}"
        if full:
            r.check("image" in svc or "build" in svc, f"{where} has an image or a build")
        image = svc.get("image")
        if image and "build" not in svc and svc.get("pull_policy") != "never":
            tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
            r.check(
                bool(tag) and tag != "latest",
                f"{where}: image {image} is pinned to a version",
            )
        build = svc.get("build")
        if build is not None:
            ctx = build if isinstance(build, str) else build.get("context", ".")
            ctx_path = (base / ctx).resolve()
            r.check(ctx_path.is_dir(), f"{where}: build context {rel(ctx_path)} exists")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            df_path = (ctx_path / dockerfile).resolve()
            r.check(df_path.is_file(), f"{where}: Dockerfile {rel(df_path)} exists")
        for vol in svc.get("volumes") or []:
            if isinstance(vol, dict):
                src, vtype = vol.get("source", ""), vol.get("type", "volume")
            else:
                src = vol.split(":", 1)[0] if ":" in vol else ""
                vtype = "bind" if src.startswith((".", "/", "~")) else "volume"
            if vtype == "bind":
                src_path = (base / src).resolve()
                r.check(src_path.exists(), f"{where}: bind-mounted {rel(src_path)} exists")
            elif src:
                r.check(src in declared_volumes, f"{where}: volume {src} is declared")
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            if not full and dep not in services:
                continue
            if not r.check(dep in services, f"{where}: depends_on {dep} exists"):
                continue
            cond = (spec or {}).get("condition", "service_started")
            if cond == "service_healthy":
                r.check(
                    "healthcheck" in services[dep],
                    f"{where}: {dep} (waited for as healthy) has a healthcheck",
                )
            elif cond == "service_completed_successfully":
                r.check(
                    str(services[dep].get("restart", "no")) == "no",
                    f"{where}: {dep} (waited for to complete) is one-shot (restart: no)",
                )
    if full:
        built = {}
        for sname, svc in services.items():
            if "build" in svc and svc.get("image"):
                built.setdefault(svc["image"], []).append(sname)
        twice = {i: s for i, s in built.items() if len(s) > 1}
        r.check(
            not twice,
            f"{name}: no image tag is built by two services (parallel builds of one tag collide)",
            str(twice),
        )
        for sname, svc in services.items():
            image = svc.get("image", "")
            if "build" not in svc and image.split(":")[0] in ("gridwatch",):
                r.check(
                    image in built and svc.get("pull_policy") == "never",
                    f"{name}: service {sname}: image {image} is built by service {', '.join(built.get(image, ['?']))}"
                    " and never pulled",
                )
        host_ports = []
        for svc in services.values():
            for p in svc.get("ports") or []:
                parts = str(p).split(":")
                if len(parts) >= 2:
                    host_ports.append(parts[-2])
        dupes = sorted({p for p in host_ports if host_ports.count(p) > 1})
        r.check(not dupes, f"{name}: published host ports are distinct", ", ".join(dupes))


def merge(base, override):
    """Compose's merge of an override file, for the keys this stack uses."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    return override


def parse_listeners(value: str) -> dict[str, tuple[str, int]]:
    out = {}
    for item in filter(None, (v.strip() for v in value.split(","))):
        m = re.fullmatch(r"([A-Z_]+)://([^:]*):(\d+)", item)
        if m:
            out[m.group(1)] = (m.group(2), int(m.group(3)))
    return out


def check_kafka(r: Report, services: dict) -> str | None:
    kafka = services.get("kafka") or {}
    env = env_of(kafka)
    image = kafka.get("image", "")
    m = re.fullmatch(r"apache/kafka:(\d+)\.(\d+)\.\d+", image)
    r.check(
        bool(m) and (int(m.group(1)), int(m.group(2))) >= (3, 9),
        f"kafka: image {image} is apache/kafka 3.9 or later",
    )
    r.check(
        env.get("KAFKA_PROCESS_ROLES", "").replace(" ", "") in ("broker,controller", "controller,broker"),
        "kafka: KRaft combined broker and controller",
    )
    listeners = parse_listeners(env.get("KAFKA_LISTENERS", ""))
    advertised = parse_listeners(env.get("KAFKA_ADVERTISED_LISTENERS", ""))
    protocol_map = dict(
        item.split(":", 1) for item in env.get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "").split(",") if ":" in item
    )
    controller = env.get("KAFKA_CONTROLLER_LISTENER_NAMES", "")
    r.check(
        set(listeners) <= set(protocol_map) and bool(listeners),
        "kafka: every listener has a security protocol",
    )
    r.check(controller in listeners and controller not in advertised, "kafka: controller listener is internal only")
    r.check(set(advertised) <= set(listeners), "kafka: every advertised listener is a listener")
    r.check(env.get("KAFKA_INTER_BROKER_LISTENER_NAME") in listeners, "kafka: inter-broker listener exists")
    voters = env.get("KAFKA_CONTROLLER_QUORUM_VOTERS", "")
    vm = re.fullmatch(r"(\d+)@([^:]+):(\d+)", voters)
    r.check(
        bool(vm)
        and vm.group(1) == str(env.get("KAFKA_NODE_ID"))
        and int(vm.group(3)) == listeners.get(controller, ("", -1))[1],
        f"kafka: quorum voter {voters} is this node's controller listener",
    )
    r.check(bool(re.fullmatch(r"[A-Za-z0-9_-]{22}", env.get("CLUSTER_ID", ""))), "kafka: CLUSTER_ID is a base64 UUID")
    internal = [f"{h}:{p}" for n, (h, p) in advertised.items() if h == "kafka"]
    r.check(internal == ["kafka:9092"], "kafka: advertises kafka:9092 to other containers", str(internal))
    host = [(n, p) for n, (h, p) in advertised.items() if h == "localhost"]
    published = {str(p).split(":")[-1]: str(p).split(":")[-2] for p in kafka.get("ports") or []}
    r.check(
        len(host) == 1 and published.get(str(host[0][1])) == str(host[0][1]),
        "kafka: host listener localhost:PORT is published on the same port",
        f"advertised {host}, published {published}",
    )
    r.check("healthcheck" in kafka, "kafka: has a healthcheck")
    return internal[0] if internal else None


def parse_init_topics(r: Report) -> dict[str, tuple[int, dict]]:
    created = {}
    try:
        text = INIT_TOPICS.read_text(encoding="utf-8")
    except FileNotFoundError:
        r.fail(f"{rel(INIT_TOPICS)} exists")
        return created
    for line in text.splitlines():
        m = re.match(r"^\s*create\s+(\S+)\s+(\d+)(.*)$", line)
        if m:
            configs = dict(re.findall(r"--config\s+([\w.]+)=(\S+)", m.group(3)))
            created[m.group(1)] = (int(m.group(2)), configs)
    for topic, (partitions, configs) in EXPECTED_TOPICS.items():
        got = created.get(topic)
        r.check(
            got is not None and got[0] == partitions and all(got[1].get(k) == v for k, v in configs.items()),
            f"init-topics creates {topic} ({partitions} partition{'s' if partitions > 1 else ''}"
            + "".join(f", {k}={v}" for k, v in configs.items())
            + ")",
            f"found {got}",
        )
    r.check("--if-not-exists" in text, "init-topics is idempotent (--if-not-exists)")
    return created


# ── gridwatch.toml ───────────────────────────────────────────────────────────────────────────


def example_keys() -> dict[str, set[str]]:
    """Sections and keys documented in examples/gridwatch.toml, active or commented out."""
    keys: dict[str, set[str]] = {}
    section = None
    for line in EXAMPLE_TOML.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        m = re.fullmatch(r"#?\s*\[([a-z_.]+)\]", s)
        if m:
            section = m.group(1).split(".")[0]
            keys.setdefault(section, set())
            if "." in m.group(1):
                keys[section].add(m.group(1).split(".")[1])
            continue
        m = re.match(r"#?\s*([a-z_]+)\s*=", s)
        if m and section:
            keys[section].add(m.group(1))
    return keys


def check_gridwatch_toml(r: Report, services: dict, created: dict, bootstrap: str | None) -> None:
    try:
        config = tomllib.loads(GRIDWATCH_TOML.read_text(encoding="utf-8"))
    except (FileNotFoundError, tomllib.TOMLDecodeError) as e:
        r.fail(f"{rel(GRIDWATCH_TOML)} parses as TOML: {e}")
        return
    r.ok(f"{rel(GRIDWATCH_TOML)} parses as TOML")
    known = example_keys()
    for section, table in config.items():
        if section == "kafka":
            continue  # librdkafka properties pass through
        for key in table if isinstance(table, dict) else []:
            if section in known and key in known[section]:
                continue
            if (section, key) in PENDING_CONFIG_KEYS:
                r.pend(f"gridwatch.toml: [{section}] {key} is not in examples/gridwatch.toml yet (being added)")
            else:
                r.fail(f"gridwatch.toml: [{section}] {key} is an option examples/gridwatch.toml documents")

    kafka = config.get("kafka", {})
    r.check(
        kafka.get("bootstrap.servers") == bootstrap == "kafka:9092",
        "gridwatch.toml: bootstrap.servers is kafka's internal listener (kafka:9092)",
        f"{kafka.get('bootstrap.servers')} vs {bootstrap}",
    )
    topics = config.get("source", {}).get("topics", [])
    registry = config.get("registry", {}).get("topic")
    sink = config.get("sink", {})
    for t in topics:
        r.check(t.get("name") in created, f"gridwatch.toml: reading topic {t.get('name')} is created")
    r.check(
        registry in created and created[registry][1].get("cleanup.policy") == "compact",
        f"gridwatch.toml: registry topic {registry} is created compacted",
    )
    for key in ("events_topic", "dead_letter_topic"):
        r.check(sink.get(key) in created, f"gridwatch.toml: sink.{key} {sink.get(key)} is created")
    changelog = config.get("detect", {}).get("changelog")
    if changelog is not None:
        topic = changelog.get("topic")
        r.check(
            topic in created and created[topic][1].get("cleanup.policy") == "compact",
            f"gridwatch.toml: detect.changelog topic {topic} is created compacted",
        )

    sim = command_of(services.get("simulator", {}))
    r.check(sim[:1] == ["simulate"], "simulator: runs `gridwatch simulate`")
    r.check(flag(sim, "--brokers") == bootstrap, "simulator: --brokers is kafka:9092")
    sim_topic, sim_payload = flag(sim, "--topic"), flag(sim, "--payload")
    r.check(
        any(t.get("name") == sim_topic and t.get("payload") == sim_payload for t in topics),
        f"simulator: --topic {sim_topic} --payload {sim_payload} is a gridwatch reading topic of that payload",
    )
    r.check(flag(sim, "--nodes-topic") == registry, f"simulator: --nodes-topic is the registry topic {registry}")
    r.check(flag(sim, "--speed") == "1" and flag(sim, "--bad-input-every") == "300", "simulator: --speed 1 --bad-input-every 300")

    gw = services.get("gridwatch", {})
    cmd = command_of(gw)
    target = flag(cmd, "--config")
    r.check(cmd[:1] == ["run"] and target is not None, "gridwatch: runs `gridwatch run --config FILE`")
    mounts = [v for v in gw.get("volumes") or [] if isinstance(v, str)]
    r.check(
        any(v.split(":")[0] == "./gridwatch.toml" and v.split(":")[1] == target for v in mounts),
        f"gridwatch: compose/gridwatch.toml is mounted at {target}",
    )
    listen = config.get("admin", {}).get("listen", "")
    m = re.fullmatch(r"0\.0\.0\.0:(\d+)", listen)
    r.check(bool(m) and int(m.group(1)) == ADMIN_PORT, f"gridwatch.toml: [admin] listen = \"0.0.0.0:{ADMIN_PORT}\"")
    r.check(
        f"{ADMIN_PORT}:{ADMIN_PORT}" in [str(p) for p in gw.get("ports") or []],
        f"gridwatch: admin port {ADMIN_PORT} is published",
    )
    hc = " ".join(strings_in(gw.get("healthcheck", {}).get("test", [])))
    r.check(
        "/healthz" in hc and f"/{ADMIN_PORT}" in hc,
        f"gridwatch: healthcheck asks /healthz on port {ADMIN_PORT}",
    )
    # The healthcheck runs in the runtime image: only tools that image has.
    r.check(
        not re.search(r"\b(curl|wget|nc)\b", hc),
        "gridwatch: healthcheck uses no tool the image lacks (curl, wget, nc)",
    )


# ── Prometheus and Grafana ───────────────────────────────────────────────────────────────────


def check_prometheus(r: Report) -> None:
    prom = load_yaml(r, PROMETHEUS_YML)
    if not isinstance(prom, dict):
        return
    jobs = {j.get("job_name"): j for j in prom.get("scrape_configs") or []}
    job = jobs.get("gridwatch")
    if not r.check(job is not None, "prometheus.yml: has a gridwatch job"):
        return
    targets = [t for sc in job.get("static_configs") or [] for t in sc.get("targets") or []]
    r.check(targets == [f"gridwatch:{ADMIN_PORT}"], f"prometheus.yml: scrapes gridwatch:{ADMIN_PORT}")
    r.check(job.get("metrics_path", "/metrics") == "/metrics", "prometheus.yml: path /metrics")
    interval = job.get("scrape_interval", (prom.get("global") or {}).get("scrape_interval"))
    r.check(interval == "5s", "prometheus.yml: every 5s", str(interval))


def check_grafana(r: Report, services: dict) -> str | None:
    ds = load_yaml(r, DATASOURCES)
    uid = None
    if isinstance(ds, dict):
        r.check(ds.get("apiVersion") == 1, "grafana datasources: apiVersion 1")
        proms = [d for d in ds.get("datasources") or [] if d.get("type") == "prometheus"]
        if r.check(len(proms) == 1, "grafana datasources: one Prometheus datasource"):
            uid = proms[0].get("uid")
            r.check(bool(uid), "grafana datasources: Prometheus has a fixed uid")
            r.check(proms[0].get("url") == "http://prometheus:9090", "grafana datasources: url http://prometheus:9090")
    providers = load_yaml(r, DASHBOARD_PROVIDERS)
    grafana = services.get("grafana", {})
    mounts = {}
    for v in grafana.get("volumes") or []:
        if isinstance(v, str) and v.startswith("."):
            parts = v.split(":")
            mounts[parts[1]] = (COMPOSE_DIR / parts[0]).resolve()
    r.check(
        mounts.get("/etc/grafana/provisioning") == (COMPOSE_DIR / "grafana" / "provisioning").resolve(),
        "grafana: provisioning directory is mounted at /etc/grafana/provisioning",
    )
    if isinstance(providers, dict):
        r.check(providers.get("apiVersion") == 1, "grafana dashboard providers: apiVersion 1")
        paths = [(p.get("options") or {}).get("path") for p in providers.get("providers") or []]
        r.check(
            len(paths) == 1 and mounts.get(paths[0]) == DASHBOARD.parent.resolve(),
            f"grafana dashboard providers: path {paths} is where compose/grafana/dashboards is mounted",
        )
        home = env_of(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
        r.check(
            bool(home) and paths and home == f"{paths[0]}/{DASHBOARD.name}",
            f"grafana: home dashboard is {DASHBOARD.name}",
        )
    return uid


def scan_macro_calls(source: str, macro: str):
    """Yields the argument text of every `macro!( … )` call (balanced parentheses)."""
    for m in re.finditer(rf"(?<![\w:])(?:metrics::)?{macro}!\s*\(", source):
        depth, i, in_str = 1, m.end(), False
        while i < len(source) and depth:
            c = source[i]
            if in_str:
                if c == "\\":
                    i += 1
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            i += 1
        yield source[m.end() : i - 1]


def telemetry_metrics(source: str) -> dict[str, tuple[str, set[str] | None]]:
    """name -> (kind, label keys, or None when they are not literal) from src/telemetry.rs."""
    found: dict[str, tuple[str, set[str] | None]] = {}
    for kind in ("counter", "gauge", "histogram"):
        for args in scan_macro_calls(source, kind):
            m = re.match(r'\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', args)
            if not m:
                continue
            rest = args[m.end() :].strip()
            labels = set(re.findall(r'"(\w+)"\s*=>', rest))
            literal = not rest or bool(labels)
            prev = found.get(m.group(1))
            merged = labels if literal else None
            if prev and prev[1] is not None and merged is not None:
                merged = prev[1] | merged
            found[m.group(1)] = (kind, merged)
    return found


def promql_labels(expr: str) -> set[str]:
    labels = set()
    for m in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {l.strip() for l in m.group(1).split(",") if l.strip()}
    for m in re.finditer(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(1)))
    return labels


def balanced(expr: str) -> bool:
    stack, pairs, in_str = [], {")": "(", "]": "[", "}": "{"}, None
    for c in expr:
        if in_str:
            if c == in_str:
                in_str = None
            continue
        if c in "\"'":
            in_str = c
        elif c in "([{":
            stack.append(c)
        elif c in pairs:
            if not stack or stack.pop() != pairs[c]:
                return False
    return not stack and in_str is None


def check_dashboard(r: Report, ds_uid: str | None, promql_out: str | None) -> None:
    try:
        dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as e:
        r.fail(f"{rel(DASHBOARD)} parses as JSON: {e}")
        return
    r.ok(f"{rel(DASHBOARD)} parses as JSON")
    r.check(bool(dash.get("uid")) and bool(dash.get("title")), "dashboard: has a uid and a title")
    panels = dash.get("panels") or []
    ids = [p.get("id") for p in panels]
    r.check(len(ids) == len(set(ids)) and None not in ids, "dashboard: panel ids are unique")
    cells = {}
    overlap = []
    for p in panels:
        g = p.get("gridPos") or {}
        if g.get("x", 0) + g.get("w", 0) > 24:
            overlap.append(f"{p.get('title')} is wider than the grid")
        for dx in range(g.get("w", 0)):
            for dy in range(g.get("h", 0)):
                key = (g.get("x", 0) + dx, g.get("y", 0) + dy)
                if key in cells:
                    overlap.append(f"{p.get('title')} overlaps {cells[key]}")
                cells[key] = p.get("title")
    r.check(not overlap, "dashboard: panels fit the 24-column grid without overlapping", "; ".join(sorted(set(overlap))))

    registry = telemetry_metrics(TELEMETRY_RS.read_text(encoding="utf-8"))
    r.check(bool(registry), f"src/telemetry.rs defines metrics ({len(registry)} found)")
    src_text = {
        p: p.read_text(encoding="utf-8", errors="replace") for p in (ROOT / "src").rglob("*.rs")
    }
    used: set[str] = set()
    pending_seen: set[str] = set()
    exprs = []
    for p in panels:
        if p.get("type") == "row":
            continue
        title = p.get("title")
        targets = p.get("targets") or []
        uids = {(p.get("datasource") or {}).get("uid")} | {(t.get("datasource") or {}).get("uid") for t in targets}
        r.check(
            bool(targets) and ds_uid is not None and uids == {ds_uid},
            f"dashboard: panel {title!r}: {len(targets)} quer{'y' if len(targets) == 1 else 'ies'} on the provisioned datasource",
            f"datasource uids {sorted(map(str, uids))}, provisioned {ds_uid}",
        )
        for t in targets:
            expr = t.get("expr", "")
            exprs.append((title, expr))
            if not balanced(expr):
                r.fail(f"dashboard: {title!r}: unbalanced brackets or quotes in {expr}")
            labels_allowed = set(IMPLICIT_LABELS)
            labels_known = True
            for name in sorted(set(re.findall(r"\bgridwatch_[a-z0-9_]+", expr))):
                base, suffix = name, ""
                if name not in registry and name not in PENDING_METRICS:
                    for sfx in ("_bucket", "_sum", "_count"):
                        if name.endswith(sfx):
                            base, suffix = name[: -len(sfx)], sfx
                if base in registry:
                    kind, labels = registry[base]
                    if base not in used:
                        used.add(base)
                        shown = "dynamic labels" if labels is None else f"labels {sorted(labels)}" if labels else "no labels"
                        r.ok(f"dashboard: {base} is a {kind} in src/telemetry.rs ({shown})")
                elif base in PENDING_METRICS:
                    kind, labels = PENDING_METRICS[base]
                    if base not in pending_seen:
                        pending_seen.add(base)
                        elsewhere = [rel(f) for f, s in src_text.items() if f"\"{base}\"" in s and f != TELEMETRY_RS]
                        note = f" (found in {', '.join(elsewhere)}, not in src/telemetry.rs)" if elsewhere else ""
                        r.pend(f"dashboard: metric {base} is not in src/telemetry.rs yet (being added){note}")
                else:
                    r.fail(f"dashboard: {title!r}: metric {name} does not appear in src/telemetry.rs")
                    continue
                if labels is None:
                    labels_known = False
                else:
                    labels_allowed |= labels
                # Kind-specific use.
                rated = re.search(rf"\b(?:rate|increase)\(\s*{name}(?:\{{[^}}]*\}})?\[", expr)
                if suffix:
                    if kind != "histogram":
                        r.fail(f"dashboard: {title!r}: {name} is a {suffix} series but {base} is a {kind}")
                    elif not rated:
                        r.fail(f"dashboard: {title!r}: {name} is used outside rate()/increase()")
                elif kind == "counter":
                    if not name.endswith("_total"):
                        r.fail(f"dashboard: counter {name} is exported with _total")
                    if not rated:
                        r.fail(f"dashboard: {title!r}: counter {name} is used outside rate()/increase()")
                elif kind == "histogram":
                    if not re.search(rf"{name}\{{quantile=", expr):
                        r.fail(f"dashboard: {title!r}: histogram {name} used bare, not as a summary quantile")
                elif kind == "gauge" and rated:
                    r.fail(f"dashboard: {title!r}: gauge {name} is used inside rate()/increase()")
            used_labels = promql_labels(expr)
            if "cell" in " ".join(used_labels) or "node" in " ".join(used_labels):
                r.fail(f"dashboard: {title!r}: metric labels never carry cell or node ids")
            if labels_known and not used_labels <= labels_allowed:
                r.fail(f"dashboard: {title!r}: labels {sorted(used_labels - labels_allowed)} are not on the metrics it queries")
    n_exprs = len(exprs)
    r.ok(f"dashboard: {n_exprs} queries checked against src/telemetry.rs (names, kinds, labels)")

    # The panels the stack promises.
    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for _, e in exprs)

    required = {
        "readings consumed/s": r"rate\(gridwatch_readings_decoded_total\[",
        "messages consumed by topic": r"by \(topic\) \(rate\(gridwatch_messages_consumed_total",
        "dead-lettered by reason": r"by \(reason\) \(rate\(gridwatch_dead_lettered_total",
        "windows emitted": r"gridwatch_windows_emitted_total",
        "windows scored": r"gridwatch_inference_batch_size_sum",
        "inference batch size distribution": r"gridwatch_inference_batch_size_bucket",
        "inference duration distribution": r"gridwatch_inference_seconds_bucket",
        "events published by severity": r"by \(severity\) \(\w+\(gridwatch_events_published_total",
        "consumer lag by topic and partition": r"by \(topic, partition\) \(gridwatch_consumer_lag\)",
        "window close to ack latency": r"gridwatch_event_latency_seconds_bucket",
        "anomaly score quantiles": r"gridwatch_window_score_bucket",
    }
    for what, pattern in required.items():
        r.check(has(pattern), f"dashboard: has a {what} panel")
    score_panels = [p for p in panels if "gridwatch_window_score" in json.dumps(p.get("targets", []))]
    r.check(
        any("anomalies" in (p.get("description") or "") and "cell" in (p.get("description") or "") for p in score_panels),
        "dashboard: the score panel says per-cell detail lives in the anomalies topic",
    )
    unused = sorted(set(registry) - used)
    if unused:
        print(f"note     src/telemetry.rs metrics not on the dashboard: {', '.join(unused)}")

    if promql_out:
        groups = [{"name": "gridwatch-dashboard", "rules": [
            {"record": "dashboard:" + re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") + f":q{i}", "expr": e}
            for i, (title, e) in enumerate(exprs)
        ]}]
        Path(promql_out).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")


# ── Dockerfiles ──────────────────────────────────────────────────────────────────────────────


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    lines, cur = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue  # comment lines inside a continued instruction
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        lines.append(cur)
        cur = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerignore_patterns() -> list[str]:
    if not DOCKERIGNORE.is_file():
        return []
    pats = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            pats.append(s.rstrip("/").lstrip("/"))
    return pats


def _pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(relpath: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves relpath (or a directory above it) out of the context."""
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        rx = _pattern_regex(pat[1:] if neg else pat)
        if any(rx.match(prefix) for prefix in prefixes):
            result = not neg
    return result


def check_dockerfile(r: Report, path: Path, context: Path, cuda: bool) -> None:
    name = rel(path)
    if not path.is_file():
        r.fail(f"{name} exists")
        return
    instr = dockerfile_instructions(path)
    text = path.read_text(encoding="utf-8")
    args: dict[str, str] = {}
    stages = []
    for word, rest in instr:
        if word == "ARG" and not stages and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
        if word == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), rest.split()[0])
            stages.append(image)
    r.check(len(stages) >= 2, f"{name}: multi-stage ({len(stages)} stages)")
    build_image = stages[0] if stages else ""
    m = re.fullmatch(r"rust:(\d+)\.(\d+)(?:\.\d+)?-bookworm", build_image)
    r.check(
        bool(m) and (int(m.group(1)), int(m.group(2))) >= MIN_RUST,
        f"{name}: build stage is an official Rust {MIN_RUST[0]}.{MIN_RUST[1]}+ image on Debian bookworm ({build_image})",
    )
    runtime_image = stages[-1] if stages else ""
    if cuda:
        r.check(
            bool(re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", runtime_image)),
            f"{name}: runtime stage is NVIDIA's CUDA 13 cuDNN runtime image ({runtime_image})",
        )
    else:
        r.check(runtime_image == "debian:bookworm-slim", f"{name}: runtime stage is debian:bookworm-slim")
    runs = " ".join(rest for word, rest in instr if word == "RUN")
    r.check(bool(re.search(r"(^|[\s;&|])scripts/setup\.sh(\s|$)", runs)), f"{name}: runs scripts/setup.sh")
    want_build = "cargo build --release --locked" + (" --features cuda" if cuda else "")
    r.check(want_build in runs, f"{name}: runs `{want_build}`")
    if cuda:
        r.check("onnxruntime-gpu==" in runs, f"{name}: takes ONNX Runtime from the onnxruntime-gpu wheel")
        r.check(
            bool(re.search(r"GRIDWATCH__MODEL__EXECUTION_PROVIDER=cuda", text)),
            f"{name}: sets GRIDWATCH__MODEL__EXECUTION_PROVIDER=cuda",
        )
    pkgs = "libssl3t64" if cuda else "libssl3"
    r.check(bool(re.search(rf"\b{pkgs}\b", runs)) and "ca-certificates" in runs, f"{name}: runtime installs {pkgs} and ca-certificates")
    envs = " ".join(rest for word, rest in instr if word == "ENV")
    m = re.search(r"ORT_DYLIB_PATH=(\S+)", envs)
    r.check(bool(m) and m.group(1).startswith("/opt/onnxruntime/"), f"{name}: ORT_DYLIB_PATH points into /opt/onnxruntime")
    copies = [rest for word, rest in instr if word == "COPY"]
    r.check(
        any("/usr/local/bin/gridwatch" in c and "--from=build" in c for c in copies)
        and "/usr/local/bin/gridwatch" in runs,
        f"{name}: the binary ends up at /usr/local/bin/gridwatch",
    )
    r.check(any("--from=build" in c and "/opt/onnxruntime" in c for c in copies), f"{name}: runtime gets /opt/onnxruntime from the build")
    workdirs = [rest for word, rest in instr if word == "WORKDIR"]
    r.check(
        any(re.fullmatch(r"models/?\s+models/?", c) for c in copies) and bool(workdirs),
        f"{name}: models/ is copied under the final WORKDIR ({workdirs[-1] if workdirs else '?'}), "
        "so models/plant-attention-v1.json resolves",
    )
    entry = [rest for word, rest in instr if word == "ENTRYPOINT"]
    r.check(entry[-1:] == ['["gridwatch"]'], f"{name}: ENTRYPOINT [\"gridwatch\"]")
    patterns = dockerignore_patterns()
    for c in copies:
        tokens = [t for t in c.split() if not t.startswith("--")]
        if "--from=" in c or len(tokens) < 2:
            continue
        for src in tokens[:-1]:
            hits = glob.glob(str(context / src))
            if not r.check(bool(hits), f"{name}: COPY source {src} exists in the build context"):
                continue
            relsrc = src.rstrip("/") or "."
            if relsrc != ".":
                r.check(not ignored(relsrc, patterns), f"{name}: COPY source {src} is not excluded by .dockerignore")
    for needed in ("Cargo.toml", "Cargo.lock", "src", "schemas", "scripts/setup.sh", "scripts/setup-python.sh", "models"):
        r.check(not ignored(needed, patterns), f".dockerignore keeps {needed} in the build context")


def check_dockerignore(r: Report) -> None:
    pats = dockerignore_patterns()
    for p in ("target", ".venv", ".git"):
        r.check(p in pats, f".dockerignore excludes {p}/")
    # COPY keeps file modes, and the build stage runs these directly.
    for script in ("scripts/setup.sh", "scripts/setup-python.sh"):
        r.check(os.access(ROOT / script, os.X_OK), f"{script} is executable")


def check_models(r: Report) -> None:
    r.check((ROOT / "models").is_dir(), "models/ exists (the images COPY it)")
    for f in sorted(PENDING_FILES):
        path = ROOT / f
        if not path.is_file():
            r.pend(f"{f} is not in the repository yet: `gridwatch run` in the image needs it")
            continue
        r.ok(f"{f} exists")
        try:
            contract = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            r.fail(f"{f} parses as JSON: {e}")
            continue
        onnx = [s for s in strings_in(contract) if s.endswith(".onnx")]
        for o in onnx:
            r.check((path.parent / o).is_file() or (ROOT / o).is_file(), f"{f}: model file {o} exists")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strict", action="store_true", help="pending items fail too")
    ap.add_argument("--promql-out", help="write the dashboard queries as a rules file for promtool")
    a = ap.parse_args()
    r = Report(a.strict)

    compose = load_yaml(r, COMPOSE_FILE)
    services = {}
    if isinstance(compose, dict):
        services = compose.get("services") or {}
        check_compose_file(r, COMPOSE_FILE, compose, full=True)
    cuda = load_yaml(r, COMPOSE_CUDA_FILE)
    if isinstance(cuda, dict) and isinstance(compose, dict):
        check_compose_file(r, COMPOSE_CUDA_FILE, cuda, full=False)
        r.check(set((cuda.get("services") or {})) <= set(services), f"{rel(COMPOSE_CUDA_FILE)}: overrides only existing services")
        # `-f compose.yaml -f compose.cuda.yaml`: mappings merge key by key, the rest is replaced.
        merged = merge(compose, cuda)
        check_compose_file(r, COMPOSE_FILE, merged, full=True, label="compose.yaml + compose.cuda.yaml")
    bootstrap = check_kafka(r, services)
    created = parse_init_topics(r)
    init = services.get("init-topics", {})
    r.check(init.get("image") == services.get("kafka", {}).get("image"), "init-topics: same image as kafka")
    check_gridwatch_toml(r, services, created, bootstrap)
    check_prometheus(r)
    uid = check_grafana(r, services)
    check_dashboard(r, uid, a.promql_out)
    check_dockerignore(r)
    check_dockerfile(r, DOCKERFILE, ROOT, cuda=False)
    check_dockerfile(r, DOCKERFILE_CUDA, ROOT, cuda=True)
    check_models(r)

    print(f"\n{r.failures} failed, {r.pending} pending{' (strict)' if a.strict else ''}")
    return 1 if r.failures else 0


if __name__ == "__main__":
    sys.exit(main())
