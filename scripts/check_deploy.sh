#!/usr/bin/env bash
# Checks of the container image and deployment files that need no Docker engine, no cluster and
# no network (CI has none of them):
#   1. hadolint lints the Dockerfile (any finding, info level included, fails);
#   2. kubernetes-validate checks deploy/k8s/*.yaml against the Kubernetes schemas it ships;
#   3. a dry run of the image build: the build context that .dockerignore leaves, the COPY steps
#      laid out as in the image, every `pip install` target a local project (pins live in the
#      pyproject.toml files) whose extras exist, the two packages built into wheels from that
#      context (offline), the commands of ENTRYPOINT, CMD and HEALTHCHECK checked against the
#      real CLIs, and the Kubernetes and Envoy files checked against the image (port, user,
#      volumes, service name).
# What it cannot do: build the image or run it (on GPU or CPU); `envoy --mode validate`.
#
# Usage: scripts/check_deploy.sh            (tools from .venv/bin, see the dev extra)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
K8S_VERSION=${K8S_VERSION:-1.33.0}

echo "== hadolint $("$BIN/hadolint" --version | awk '{print $NF}') Dockerfile"
"$BIN/hadolint" --failure-threshold info Dockerfile

echo "== kubernetes-validate --strict (Kubernetes ${K8S_VERSION} schemas) deploy/k8s"
"$BIN/kubernetes-validate" --strict --quiet --kubernetes-version "$K8S_VERSION" deploy/k8s/*.yaml

echo "== dry run of the image build"
"$BIN/python" - "$BIN" <<'PY'
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

import yaml

BIN = Path(sys.argv[1]).absolute()
ROOT = Path.cwd()
problems: list[str] = []


def check(ok: bool, message: str) -> bool:
    if not ok:
        problems.append(message)
    return ok


# --- Dockerfile instructions (continuations joined, comments and parser directives dropped)
instructions: list[tuple[str, str]] = []
pending = ""
for raw in (ROOT / "Dockerfile").read_text().splitlines():
    line = raw.strip()
    if not pending and (not line or line.startswith("#")):
        continue
    if pending and line.startswith("#"):
        continue
    if line.endswith("\\"):
        pending += line[:-1] + " "
        continue
    full = (pending + line).strip()
    pending = ""
    keyword, _, rest = full.partition(" ")
    instructions.append((keyword.upper(), rest.strip()))


def exec_form(rest: str) -> list[str]:
    return list(json.loads(rest)) if rest.startswith("[") else shlex.split(rest)


# --- the build context: files of a checkout (tracked, or untracked and not git-ignored) minus
# .dockerignore. Patterns follow Docker's rules: `*` and `?` stay within one path segment, `**`
# spans segments, a pattern that matches a directory covers everything below it, `!` re-includes,
# and the last matching pattern wins.
def pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i : j + 1], j + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


rules = []
for raw in (ROOT / ".dockerignore").read_text().splitlines():
    line = raw.strip()
    if line and not line.startswith("#"):
        negate = line.startswith("!")
        pattern = str(PurePosixPath(line.lstrip("!").strip().lstrip("/")))
        rules.append((negate, pattern_regex(pattern)))


def in_context(path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            included = negate
    return included


listed = subprocess.run(
    ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
    check=True, capture_output=True, text=True,
).stdout.split("\0")
files = sorted(p for p in listed if p and (ROOT / p).is_file())
context = [p for p in files if in_context(p)]
leaked = [
    p for p in context
    if re.search(r"(^|/)(\.git|\.venv|tests|\.whl)(/|$)|(^|/)\.env|\.(pem|key|p12)$|id_rsa|secret", p)
]
check(not leaked, f"build context holds files it should not: {leaked[:5]}")
print(f"   build context: {len(context)} of {len(files)} files")

work = Path(tempfile.mkdtemp(prefix="check_deploy."))
try:
    rootfs = work / "rootfs"  # the build stage's file system, as far as COPY makes it
    workdir = PurePosixPath("/")
    exposed: list[str] = []
    volumes: list[str] = []
    user = ""
    entrypoint: list[str] = []
    cmd: list[str] = []
    healthcheck = ""
    pip_targets: list[str] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            workdir = PurePosixPath("/")
        elif keyword == "WORKDIR":
            workdir = workdir / rest
        elif keyword == "COPY" and "--from=" not in rest:
            args = [a for a in exec_form(rest) if not a.startswith("--")]
            *sources, dest = args
            target = rootfs / str(workdir / dest).lstrip("/")
            for source in sources:
                source = source.rstrip("/") or "."
                if not check((ROOT / source).exists(), f"COPY {source}: not in the repository"):
                    continue
                copied = [p for p in context if p == source or p.startswith(source + "/")]
                check(bool(copied), f"COPY {source}: .dockerignore leaves nothing of it in the context")
                for p in copied:
                    if p == source:  # a file: into the directory `dest/`, or as `dest`
                        into = target / Path(p).name if dest.endswith("/") or len(sources) > 1 else target
                    else:  # a directory: its contents into `dest`
                        into = target / p[len(source) + 1 :]
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / p, into)
        elif keyword == "RUN":
            for segment in re.split(r"&&|;;|;|\|", rest):
                if "pip install" not in segment:
                    continue
                words = shlex.split(segment.split("pip install", 1)[1])
                skip_value = False
                for word in words:
                    if skip_value:
                        skip_value = False
                    elif word in ("--extra-index-url", "--index-url", "-i", "--find-links", "-f"):
                        skip_value = True
                    elif not word.startswith("-"):
                        pip_targets.append(word)
        elif keyword == "EXPOSE":
            exposed += rest.split()
        elif keyword == "VOLUME":
            volumes += exec_form(rest)
        elif keyword == "USER":
            user = rest
        elif keyword == "ENTRYPOINT":
            entrypoint = exec_form(rest)
        elif keyword == "CMD":
            cmd = exec_form(rest)
        elif keyword == "HEALTHCHECK":
            healthcheck = rest

    # --- every pip target: a local project in the image's file system, with existing extras
    check(bool(pip_targets), "no `pip install` found in the Dockerfile")
    projects: list[Path] = []
    for spec in pip_targets:
        found = re.fullmatch(r"(?P<path>[^\[\]]+)(?:\[(?P<extras>[^\]]*)\])?", spec)
        path = found["path"] if found else spec
        if not check(path.startswith(("/", ".")), f"pip install {spec}: a named package; pin it in pyproject.toml"):
            continue
        local = rootfs / str(workdir / path).lstrip("/")
        pyproject = local / "pyproject.toml"
        if not check(pyproject.is_file(), f"pip install {spec}: no pyproject.toml at {path} in the image"):
            continue
        if local not in projects:
            projects.append(local)
        declared = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
        for extra in filter(None, (found["extras"] or "").split(",") if found else []):
            check(extra in declared, f"pip install {spec}: {path} has no extra {extra!r}")
            print(f"   {spec}: extra {extra} = {declared.get(extra)}")

    # --- build both packages into wheels from that file system, offline
    wheels = work / "wheels"
    built = subprocess.run(
        [str(BIN / "pip"), "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(wheels), *map(str, projects)],
        cwd=work, capture_output=True, text=True,
    )
    check(built.returncode == 0, f"building the wheels from the image's files failed:\n{built.stderr[-2000:]}")
    names: set[str] = set()
    scripts: set[str] = set()
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            names |= set(z.namelist())
            for entry in (n for n in z.namelist() if n.endswith("entry_points.txt")):
                scripts |= {ln.split("=")[0].strip() for ln in z.read(entry).decode().splitlines() if "=" in ln}
    print(f"   built {sorted(w.name for w in wheels.glob('*.whl'))}")
    rooms = [f"probeserve/{room}/__init__.py" for room in ("core", "engines", "pairing", "transport")]
    for needed in ("probeserve/cli.py", "probeserve/transport/server.py", *rooms,
                   "probeserve_client/_proto/probeserve/v1/probe_service_pb2.py"):
        check(needed in names, f"the wheels lack {needed}")
    for script in ("probeserve", "probeserve-client"):
        check(script in scripts, f"no console script {script!r} in the wheels")

    # --- ENTRYPOINT + CMD against the real `probeserve serve`, HEALTHCHECK against the client CLI
    check(entrypoint[:2] == ["probeserve", "serve"], f"ENTRYPOINT is not `probeserve serve`: {entrypoint}")
    serve_help = subprocess.run([str(BIN / "probeserve"), "serve", "--help"],
                                check=True, capture_output=True, text=True).stdout
    client_help = subprocess.run([str(BIN / "probeserve-client"), "--help"],
                                 check=True, capture_output=True, text=True).stdout

    def flags_known(args: list[str], where: str) -> None:
        for arg in args:
            if arg.startswith("--"):
                flag = arg.split("=")[0]
                check(re.search(rf"{re.escape(flag)}\b", serve_help) is not None,
                      f"{where}: `probeserve serve` has no {flag}")

    flags_known(entrypoint[2:] + cmd, "ENTRYPOINT/CMD")
    for flag in ("--target", "--timeout", "health"):
        check(flag in client_help and flag in healthcheck, f"HEALTHCHECK: {flag} not used or not in the client CLI")
    port = entrypoint[entrypoint.index("--port") + 1] if "--port" in entrypoint else ""
    check(f"{port}" in exposed or f"{port}/tcp" in exposed, f"EXPOSE {exposed} does not match --port {port}")
    check(f"127.0.0.1:{port}" in healthcheck, "HEALTHCHECK does not ask the served port")

    # --- Kubernetes manifests against the image
    docs = [d for f in sorted((ROOT / "deploy/k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    for kind in ("Deployment", "Service", "PodDisruptionBudget"):
        check(kind in by_kind, f"deploy/k8s has no {kind}")
    deployment, service = by_kind.get("Deployment", {}), by_kind.get("Service", {})
    pod = deployment.get("spec", {}).get("template", {}).get("spec", {})
    (container,) = pod.get("containers", [{}])
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    check(str(ports.get("grpc")) == port, f"Deployment's grpc port {ports.get('grpc')} != image port {port}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        got = container.get(probe, {}).get("grpc", {}).get("port")
        check(str(got) == port, f"Deployment's {probe} is not a gRPC health probe on {port}: {got}")
    resources = container.get("resources", {})
    check("nvidia.com/gpu" in resources.get("limits", {}), "Deployment requests no nvidia.com/gpu")
    check(all(k in resources.get(s, {}) for s in ("requests", "limits") for k in ("cpu", "memory")),
          "Deployment lacks cpu/memory requests or limits")
    check(str(pod.get("securityContext", {}).get("runAsUser")) == user.split(":")[0],
          f"Deployment's runAsUser != the image's USER {user}")
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    check(set(volumes) <= mounts, f"Deployment does not mount the image's volumes {volumes}")
    flags_known(container.get("args", []), "Deployment args")
    for arg in container.get("args", []) + cmd:
        if arg.startswith(("--bundle", "--model")) or arg.startswith("/"):
            value = arg.split("=", 1)[-1]
            if value.startswith("/"):
                check(any(value.startswith(v + "/") for v in volumes), f"{arg}: not under a volume {volumes}")
    spec = service.get("spec", {})
    check(spec.get("clusterIP") == "None", "the Service is not headless (clusterIP: None)")
    labels = deployment.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
    check(spec.get("selector", {}).items() <= labels.items(), "the Service's selector does not match the pods")
    pdb = by_kind.get("PodDisruptionBudget", {}).get("spec", {}).get("selector", {}).get("matchLabels", {})
    check(pdb.items() <= labels.items(), "the PodDisruptionBudget's selector does not match the pods")
    dns = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"

    # --- Envoy: YAML, routes to a defined HTTP/2 cluster with gRPC health checks, at the Service
    envoy = yaml.safe_load((ROOT / "deploy/envoy/envoy.yaml").read_text())
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    routed = set(re.findall(r"'cluster': '([^']+)'", str(envoy["static_resources"]["listeners"])))
    check(bool(routed) and routed <= set(clusters), f"Envoy routes to undefined clusters {routed - set(clusters)}")
    for name in routed & set(clusters):
        cluster = clusters[name]
        options = str(cluster.get("typed_extension_protocol_options", {}))
        check("http2_protocol_options" in options, f"Envoy cluster {name} does not speak HTTP/2 upstream")
        check(any("grpc_health_check" in h for h in cluster.get("health_checks", [])),
              f"Envoy cluster {name} has no grpc_health_check")
        addresses = re.findall(r"'address': '([^']+)', 'port_value': (\d+)", str(cluster["load_assignment"]))
        check((dns, port) in addresses, f"Envoy cluster {name} does not point at {dns}:{port}: {addresses}")
finally:
    shutil.rmtree(work, ignore_errors=True)

for problem in problems:
    print(f"   FAIL {problem}")
if problems:
    sys.exit(1)
print("   ok: context, COPY sources, pip targets and extras, wheels, CLI flags, manifests, Envoy")
PY
echo "check_deploy: all checks passed"
