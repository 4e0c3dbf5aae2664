"""Render a Prefect Kubernetes work-pool base job template into the Job manifest its worker would submit.

Fills the `{{ variable }}` placeholders from the template's variable defaults plus overrides with Prefect's
own templating (`apply_values`), then does what the Kubernetes worker does per flow run (env as a list,
args from the command string, generateName from the run name, labels on the pod). It is stricter than the
worker in one way: a placeholder without a value is an error, where the worker would silently drop the key.

    python -m infra.k8s.render --pool gpu --set gpu_count=4 --set gpu_product=NVIDIA-H100-80GB-HBM3
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import jsonschema
from prefect.utilities.templating import PlaceholderType, apply_values, find_placeholders

TEMPLATE_DIR = Path(__file__).resolve().parent
POOLS = {"gpu": TEMPLATE_DIR / "gpu-job-template.json", "cpu": TEMPLATE_DIR / "cpu-job-template.json"}

# Variables the worker fills for every flow run; a template may leave them without defaults.
WORKER_VARIABLES = ("name", "command", "env", "labels")
# What the worker runs in the image when the deployment sets no command.
FLOW_RUN_COMMAND = "prefect flow-run execute"
# prefect-kubernetes checks that these sit in the pod template's spec, where Kubernetes has no such fields
# (the API server drops them with a warning); `api_view` removes them to show what the cluster stores.
WORKER_ONLY_POD_FIELDS = ("parallelism", "completions")


class TemplateError(ValueError):
    """A template, override or rendered value that cannot make a Job; the message is one line."""


def load_template(pool_or_path: str | Path) -> dict:
    """The base job template of pool `gpu`/`cpu`, or of a JSON file."""
    path = POOLS.get(str(pool_or_path), Path(pool_or_path))
    try:
        template = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TemplateError(f"no template {path} (pools: {', '.join(POOLS)})") from None
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{path}: not JSON: {exc}") from None
    if not isinstance(template, dict) or not {"job_configuration", "variables"} <= template.keys():
        raise TemplateError(f"{path}: a base job template needs `job_configuration` and `variables`")
    return template


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value); the value is JSON when it parses (4, true, [...]), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise TemplateError(f"override {text!r} is not key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def job_variables(template: dict, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Variable defaults (None counts as unset, as for the worker) updated by overrides, checked
    against the template's variables schema the way Prefect checks a deployment's job variables."""
    schema = template["variables"]
    properties = schema.get("properties", {})
    unknown = sorted(set(overrides or {}) - set(properties))
    if unknown:
        raise TemplateError(f"unknown variable(s) {', '.join(unknown)}; the template has: {', '.join(sorted(properties))}")
    values = {name: copy.deepcopy(spec["default"]) for name, spec in properties.items()
              if spec.get("default") is not None}
    values.update(overrides or {})
    try:
        jsonschema.validate(values, schema)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "variables"
        raise TemplateError(f"{where}: {exc.message}") from None
    return values


def check_placeholders(template: dict, values: dict[str, Any]) -> None:
    """Every placeholder in job_configuration must be a declared variable with a value."""
    declared = template["variables"].get("properties", {})
    for placeholder in sorted(find_placeholders(template["job_configuration"]), key=lambda p: p.name):
        if placeholder.type is not PlaceholderType.STANDARD:
            continue  # {{ $ENV }} / prefect.blocks / prefect.variables resolve at run time
        name = placeholder.name.split(".")[0]
        if name not in declared:
            raise TemplateError(f"job_configuration uses {{{{ {placeholder.name} }}}} but the variables declare no {name!r}")
        if name not in values:
            raise TemplateError(f"job_configuration uses {{{{ {placeholder.name} }}}} but variable {name!r} has no default "
                                f"and no value was given (set one, e.g. --set {name}=...)")


def render(template: dict | str | Path, overrides: dict[str, Any] | None = None, *,
           flow_run_name: str = "apo-stage", flow_run_env: dict[str, str] | None = None) -> dict:
    """The Job manifest the Kubernetes worker would submit for a flow run named `flow_run_name`.
    `flow_run_env` stands for the env the worker adds (PREFECT_API_URL, PREFECT__FLOW_RUN_ID, ...)."""
    if not isinstance(template, dict):
        template = load_template(template)
    worker_values = {"name": flow_run_name, "command": FLOW_RUN_COMMAND, "env": {}, "labels": {}}
    values = job_variables(template, overrides)
    values = {**{k: v for k, v in worker_values.items() if k in template["variables"].get("properties", {})}, **values}
    check_placeholders(template, values)
    config = apply_values(copy.deepcopy(template["job_configuration"]), values)
    manifest = config.get("job_manifest")
    try:
        container = manifest["spec"]["template"]["spec"]["containers"][0]
    except (TypeError, KeyError, IndexError):
        raise TemplateError("job_manifest has no spec.template.spec.containers[0]") from None

    # What prepare_for_flow_run does to the manifest.
    env = {**(config.get("env") or {}), **(flow_run_env or {})}
    container["env"] = [{"name": k, "value": None if v is None else str(v)} for k, v in env.items()]
    command = container.get("args") or config.get("command") or FLOW_RUN_COMMAND
    container["args"] = shlex.split(command) if isinstance(command, str) else command
    manifest.setdefault("metadata", {})
    manifest["metadata"].setdefault("namespace", config.get("namespace", "default"))
    manifest["metadata"]["generateName"] = f"{_slug(config.get('name') or 'prefect-job')}-"
    labels = {**manifest["metadata"].get("labels", {}), **(config.get("labels") or {})}
    manifest["metadata"]["labels"] = labels
    pod_metadata = manifest["spec"]["template"].setdefault("metadata", {})
    pod_metadata["labels"] = {**pod_metadata.get("labels", {}), **labels}
    return manifest


def api_view(manifest: dict) -> dict:
    """The manifest as the Kubernetes API server keeps it: without the fields it drops."""
    manifest = copy.deepcopy(manifest)
    pod = manifest["spec"]["template"]["spec"]
    for field in WORKER_ONLY_POD_FIELDS:
        pod.pop(field, None)
    return manifest


def _slug(name: str) -> str:
    """A DNS-1123 name prefix (lowercase alphanumerics and '-', at most 57 characters + the worker's '-')."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:57].rstrip("-") or "prefect-job"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.k8s.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", default="gpu", help="gpu, cpu, or the path of a base job template (JSON)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="VAR=VALUE",
                        help="a job variable (value parsed as JSON when it parses: 4, true, [...])")
    parser.add_argument("--name", default="apo-stage", help="flow-run name the Job is named after")
    parser.add_argument("--api", action="store_true", help="print what the API server stores (no worker-only fields)")
    args = parser.parse_args(argv)
    try:
        manifest = render(args.pool, dict(parse_override(o) for o in args.overrides), flow_run_name=args.name)
    except TemplateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(api_view(manifest) if args.api else manifest, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
