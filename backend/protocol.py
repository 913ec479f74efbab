"""The JSON bodies Label Studio 1.23 posts to an ML backend, read and type-checked before any work starts.

Label Studio sends (ml/api_connector.py, webhooks/utils.py):
  /setup    {"project": "<id>.<created>", "schema": xml, "hostname", "access_token", "extra_params"}
  /predict  {"tasks": [task objects with "data"], "project", "label_config": xml,
             "params": {"login", "password", "context": interactive clicks/boxes/text or null}}
  /webhook  {"action": "ANNOTATION_CREATED" | "START_TRAINING" | ..., "project": {"id", "label_config", ...}, ...}
  /train    {"annotations": [...], "project": "<id>.<created>", "label_config": xml, "params"}
and this backend's own /refresh takes {"project": id}.
Every reader returns the fields the backend uses, typed, or raises BadRequest with the HTTP status and a
message naming what is wrong, so malformed input gets a 4xx instead of a crash deep in the model.
Fields the backend does not use (extra_params, login/password, annotations of /train) only have to be JSON.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# Label Studio's payloads nest about 8 levels (webhook > annotation > result > value > points > point);
# task data is the user's own JSON. Deeper bodies are refused before anything walks them recursively.
MAX_DEPTH = 100
_PROJECT_UID = re.compile(r"^(\d+)(\.\d+)?$")


class BadRequest(ValueError):
    """The request body cannot be used; `status` is the HTTP status to answer with (400 or 415)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_json_object(body: bytes, mimetype: str) -> dict[str, Any]:
    """The body as a JSON object; BadRequest for another content type, invalid JSON or too deep nesting."""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise BadRequest(f"the body must be JSON sent with Content-Type: application/json, got "
                         f"{mimetype or 'no Content-Type'!s}", 415)
    if not body.strip():
        raise BadRequest("the request body is empty: expected a JSON object")
    try:
        data = json.loads(body)
    except RecursionError:
        raise BadRequest(f"the JSON body is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except UnicodeDecodeError as e:
        raise BadRequest(f"the body is not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object, got a JSON {_json_type(data)}")
    if _deeper_than(data, MAX_DEPTH):
        raise BadRequest(f"the JSON body is nested too deeply (at most {MAX_DEPTH} levels)")
    return data


def _deeper_than(value: Any, limit: int) -> bool:
    """True when containers nest more than `limit` levels; iterative, so it cannot overflow the stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(value),
                                                                                             type(value).__name__)


def _string(data: dict, key: str, what: str, required: bool = True, where: str = "") -> str | None:
    value = data.get(key)
    if value is None or (value == "" and not required):
        if required:
            raise BadRequest(f'"{where}{key}" ({what}) is required')
        return None
    if not isinstance(value, str):
        raise BadRequest(f'"{where}{key}" ({what}) must be a string, got a JSON {_json_type(value)}')
    if required and not value.strip():
        raise BadRequest(f'"{where}{key}" ({what}) is empty')
    return value


def project_id(value: Any, where: str) -> str | None:
    """The id in Label Studio's project uid "<id>.<created timestamp>" or a bare id; None when absent.

    Checked because the id names the project's folder of fine-tuned versions on disk."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    match = _PROJECT_UID.match(value) if isinstance(value, str) else None
    if match is None:
        raise BadRequest(f'"{where}" must be a project id or Label Studio\'s "<id>.<timestamp>", '
                         f"got {json.dumps(value)[:60]}")
    return match.group(1)


@dataclass(frozen=True)
class SetupRequest:
    label_config: str
    project: str | None
    hostname: str | None
    access_token: str | None


def read_setup(data: dict[str, Any]) -> SetupRequest:
    """/setup: the label config arrives as "schema" (Label Studio) or "label_config"."""
    key = "schema" if data.get("schema") is not None or data.get("label_config") is None else "label_config"
    return SetupRequest(label_config=_string(data, key, "the project's label config XML"),
                        project=project_id(data.get("project"), "project"),
                        hostname=_string(data, "hostname", "Label Studio's address", required=False),
                        access_token=_string(data, "access_token", "a Label Studio API token", required=False))


@dataclass(frozen=True)
class PredictRequest:
    tasks: list[dict[str, Any]]
    label_config: str
    project: str | None
    context: Any  # interactive pre-annotation: the user's clicks, boxes or text (None for plain predictions)


def read_predict(data: dict[str, Any]) -> PredictRequest:
    """/predict: a list of task objects, each with a "data" object; one bad image later fails only its task."""
    tasks = data.get("tasks")
    if not isinstance(tasks, list):
        got = "missing" if tasks is None else f"a JSON {_json_type(tasks)}"
        raise BadRequest(f'"tasks" must be a list of task objects, got {got}')
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise BadRequest(f'"tasks[{i}]" must be a task object, got a JSON {_json_type(task)}')
        if not isinstance(task.get("data"), dict):
            got = "missing" if task.get("data") is None else f"a JSON {_json_type(task['data'])}"
            raise BadRequest(f'"tasks[{i}].data" must be an object of the task\'s data fields, got {got}')
    params = data.get("params")
    if params is not None and not isinstance(params, dict):
        raise BadRequest(f'"params" must be an object, got a JSON {_json_type(params)}')
    context = (params or {}).get("context")  # checked by backend.interactive, which reads it
    return PredictRequest(tasks=tasks, label_config=_string(data, "label_config", "the project's label config XML"),
                          project=project_id(data.get("project"), "project"), context=context)


@dataclass(frozen=True)
class WebhookRequest:
    action: str
    payload: dict[str, Any]


def read_webhook(data: dict[str, Any]) -> WebhookRequest:
    """/webhook: an "action" and, for the events that train, the project object Label Studio serialises."""
    action = _string(data, "action", "the Label Studio event name")
    project = data.get("project")
    if project is not None:
        if not isinstance(project, dict):
            raise BadRequest(f'"project" must be the project object, got a JSON {_json_type(project)}')
        if project.get("id") is not None and project_id(project["id"], "project.id") is None:
            raise BadRequest('"project.id" is empty')
        _string(project, "label_config", "the project's label config XML", required=False, where="project.")
    return WebhookRequest(action=action, payload=data)


def read_train(data: dict[str, Any]) -> WebhookRequest:
    """/train (Label Studio without the webhook training flag): the same as a START_TRAINING webhook."""
    project = project_id(data.get("project"), "project")
    if project is None:
        raise BadRequest('"project" (Label Studio\'s "<id>.<timestamp>") is required')
    label_config = _string(data, "label_config", "the project's label config XML")
    return WebhookRequest(action="START_TRAINING",
                          payload={"project": {"id": int(project), "label_config": label_config}})


def read_refresh(data: dict[str, Any]) -> str:
    """/refresh: the project whose stored predictions to bring to the version serving it."""
    project = project_id(data.get("project"), "project")
    if project is None:
        raise BadRequest('"project" (a project id or Label Studio\'s "<id>.<timestamp>") is required')
    return project


def read_job_status(data: dict[str, Any]) -> str:
    """/job_status: the job id Label Studio was given when training started."""
    job = data.get("job")
    if isinstance(job, int) and not isinstance(job, bool):
        return str(job)
    return _string(data, "job", "the training job id")
