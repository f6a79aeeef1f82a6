"""kubernetes_api: a minimal Kubernetes API for pods and nodes, so the real kubectl works.

The controller already has a REST API of its own (/api/containers, /api/nodes...).
This module adds, on the same Flask app and port, the few URLs that kubectl needs:

    kubectl get pods / nodes (-o wide, -o yaml, -A, -w)   a container is a pod in "default"
    kubectl describe pod X / node N                       events come from the loop's decisions
    kubectl run X --image=..., create -f, apply (--server-side) -f   declare a container
    kubectl delete pod X                                  forget it

How kubectl talks to a server (docs/kubectl.md has every request, as seen with kubectl -v=8):
  1. Discovery: GET /api, /apis, /api/v1 say which resources exist ("pods", short "po").
  2. Reads ask for a Table (Accept: ...;as=Table;g=meta.k8s.io;v=v1): the server chooses
     the columns (NAME READY STATUS...), kubectl only prints them. -o yaml asks for the object.
  3. A watch (?watch=true) is one long response: a JSON object per line, each an event
     {"type": "ADDED"|"MODIFIED"|"DELETED", "object": ...}, as things change.
  4. Every answer is JSON; every error is a Status object, which kubectl prints as
     'Error from server (NotFound): pods "x" not found'.

The controller registers it with one call (app_controller.py, beside its own routes):

    kubernetes_api.register(api, kubernetes_api.ControllerBackend(
        desired_file, status, log, timer, API_TOKEN, declare, forget))

register() takes a backend: an object with the methods below, which this module alone calls.
ControllerBackend (at the end of this file) is the controller's: it reads the same
desired_state.txt and the same observations as curl and the classroom page, so the three
always agree. Tests may give another backend.

    backend.containers()  -> [{"name": "nginx", "node": "node-2" or None,
                               "status": "running" | "pending" | "unknown" | "unscheduled"}]
         running: seen on its node; pending: on a node, not seen there yet; unknown: its
         node is silent (in its grace period); unscheduled: no live node to put it on.
    backend.nodes()       -> [{"name": "node-1", "condition": "Ready" | "NotReady" | "Unknown",
                               "reason": str or None, "since": epoch seconds or None,
                               "containers": [names it runs, as last seen], "address": "host:port"}]
    backend.declare(name) -> True if declared, False if it already was (the name is valid:
                             this module checks it first)
    backend.forget(name)  -> True if forgotten, False if it was not declared
    backend.events(name)  -> [{"time": epoch seconds, "kind": "schedule" | "start" | "stop" | "cleanup",
                               "node": str or None, "message": str}]  what the loop decided about it
    backend.may_write(authorization) -> True if a request with this Authorization header
                             (a str, "" if none) may change the cluster
    backend.when_changed(callback) -> None: call callback() (holding none of the backend's
                             locks) each time the cluster may have changed: after each tick

Why when_changed(): Kubernetes numbers every change (the resourceVersion); a list says
"this is the cluster as of version 41", a watch says "tell me what changed after 41". This
module keeps the last objects it showed and, each time it looks again (after a tick, or at
any request), numbers what differs and keeps those events for the watchers. So a list and
a watch always agree; a watcher learns of a change at the end of the tick that made it.

Who may write: reads are open; every write asks backend.may_write(). With a token set,
kubectl over plain http is read-only: client-go sends no token over http (it reads its
auth information only for a TLS transport), so the 401 says so. An app-wide
before_request that checks the token itself must let this module's requests through
(request.blueprint == "kubernetes"), or kubectl only sees "Unauthorized" without the why.

Left out on purpose: other namespaces, labels and images (accepted, not kept: the answer
says so in a warning), logs and exec, changes to a pod (PUT, label, patch: 405; kubectl
apply is accepted and changes nothing), TLS.
"""

import atexit
import functools
import json
import re
import secrets
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone

from flask import Blueprint, Response, request
from werkzeug.exceptions import Conflict, HTTPException, NotFound

from machinery import EditedMeanwhile, token_allows

NAMESPACE = "default"  # every container is a pod in this namespace
# What /version says: kubectl warns when the server is more than one minor version away.
SERVER_VERSION = {"major": "1", "minor": "37", "gitVersion": "v1.37.0-pull-mode",
                  "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "",
                  "compiler": "", "platform": "pull-mode (a teaching controller)"}
# A simulated container has no image: this is what a pod's spec shows instead.
SIMULATED_IMAGE = "pull-mode/simulated"
WATCH_SECONDS_DEFAULT = 1800  # a watch without timeoutSeconds ends after this (kube-apiserver: 30-60 min)
HISTORY_LIMIT = 1000  # events kept for watchers; a watch from an older version gets 410 Gone
KEEPALIVE_SECONDS = 2.0  # an idle watch writes a newline this often, to learn that its client left
# sendInitialEvents: the bookmark that ends the initial events carries this annotation.
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
JSON = "application/json"


class KubernetesError(Exception):
    """An error to answer as a Kubernetes Status (kubectl prints its reason and message)."""

    def __init__(self, code, reason, message, name=None, kind=None, causes=None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.name, self.kind, self.causes = name, kind, causes


def status_object(code, reason, message, name=None, kind=None, causes=None):
    """A metav1.Status, the shape of every Kubernetes error (and of a 410 during a watch)."""
    details = {key: value for key, value in (("name", name), ("kind", kind), ("causes", causes)) if value}
    status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
              "message": message, "reason": reason, "code": code}
    if details:
        status["details"] = details
    return status


def json_response(document, code=200, warnings=()):
    """A JSON answer; each warning becomes a 'Warning: 299 - "text"' header, which kubectl prints."""
    response = Response(json.dumps(document), status=code, mimetype=JSON)
    for text in warnings:
        response.headers.add("Warning", warning_header(text))
    return response


def warning_header(text):
    """RFC 7234's warning format, as kube-apiserver sends it: 299 - "text" (quotes escaped)."""
    return '299 - "' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def timestamp(epoch):
    """Epoch seconds -> RFC 3339 in UTC, to the second, as Kubernetes writes times."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text):
    """RFC 3339 in UTC (as timestamp() writes it) -> epoch seconds."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def human_duration(seconds):
    """An age as kubectl shows it: 45s, 3m20s, 25m, 5h10m, 3d: apimachinery's HumanDuration."""
    seconds = int(seconds)
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = hours // 24 % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def age(obj, now):
    """The AGE column of an object: how long since its creationTimestamp."""
    return human_duration(now - parse_timestamp(obj["metadata"]["creationTimestamp"]))


def invalid_name_message(name):
    """Why `name` is not a DNS-1123 label, in kube-apiserver's words (empty if it is one).

    The same rule as the controller's NAME_PATTERN, [a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?,
    checked in two parts so that the message says which part fails."""
    problems = []
    if len(name) > 63:
        problems.append("must be no more than 63 characters")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        problems.append("a lowercase RFC 1123 label must consist of lower case alphanumeric "
                        "characters or '-', and must start and end with an alphanumeric character "
                        "(e.g. 'my-name',  or '123-abc', regex used for validation is "
                        "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
    return "; ".join(problems)


# ---------------------------------------------------------------------------
# Selectors: kubectl -l and --field-selector, and what describe and wait send
# ---------------------------------------------------------------------------
# The fields each kind can be selected on (kube-apiserver refuses the others too).
SELECTABLE_FIELDS = {
    "Pod": {"metadata.name", "metadata.namespace", "spec.nodeName", "status.phase"},
    "Node": {"metadata.name"},
    "Event": {"metadata.name", "metadata.namespace", "involvedObject.kind", "involvedObject.name",
              "involvedObject.namespace", "involvedObject.uid", "involvedObject.apiVersion",
              "reason", "type"},
}


def parse_field_selector(text, kind):
    """'spec.nodeName=node-1,status.phase!=Failed' -> [(field, wanted, equal)], or a 400."""
    terms = []
    for term in filter(None, text.split(",")):
        if "!=" in term:
            field, _, value = term.partition("!=")
            equal = False
        else:
            field, _, value = term.replace("==", "=", 1).partition("=")
            equal = True
            if "=" not in term:
                raise KubernetesError(400, "BadRequest", f"invalid field selector: {term!r}: use field=value")
        if field not in SELECTABLE_FIELDS[kind]:
            raise KubernetesError(400, "BadRequest",
                                  f'field label not supported: {field} (for {kind}: '
                                  f'{", ".join(sorted(SELECTABLE_FIELDS[kind]))})')
        terms.append((field, value, equal))
    return terms


def field_value(obj, field):
    """The value of a dotted field in an object, "" if absent (an unscheduled pod's spec.nodeName)."""
    value = obj
    for part in field.split("."):
        value = value.get(part, "") if isinstance(value, dict) else ""
    return str(value)


def parse_label_selector(text):
    """'app=web,tier!=db,canary,!legacy' -> [(key, operator, value)]; set-based (in, notin) is a 400."""
    requirements = []
    for term in filter(None, (part.strip() for part in text.split(","))):
        if " in " in term or " notin " in term or "(" in term:
            raise KubernetesError(400, "BadRequest", f"label selector {term!r}: only =, == , != "
                                  "and key or !key are supported here")
        if "!=" in term:
            key, _, value = term.partition("!=")
            requirements.append((key.strip(), "!=", value.strip()))
        elif "=" in term:
            key, _, value = term.replace("==", "=", 1).partition("=")
            requirements.append((key.strip(), "=", value.strip()))
        elif term.startswith("!"):
            requirements.append((term[1:].strip(), "absent", None))
        else:
            requirements.append((term, "present", None))
    return requirements


def matches(obj, field_terms, label_requirements):
    """True if the object passes both selectors (an empty selector passes everything)."""
    for field, wanted, equal in field_terms:
        if (field_value(obj, field) == wanted) != equal:
            return False
    labels = obj["metadata"].get("labels") or {}
    for key, operator, value in label_requirements:
        if operator == "=" and labels.get(key) != value:
            return False
        if operator == "!=" and labels.get(key) == value:
            return False
        if operator == "present" and key not in labels:
            return False
        if operator == "absent" and key in labels:
            return False
    return True


# ---------------------------------------------------------------------------
# Tables: what kubectl get prints. The server picks the columns; priority 1 = -o wide only.
# ---------------------------------------------------------------------------
POD_COLUMNS = [
    {"name": "Name", "type": "string", "format": "name", "priority": 0,
     "description": "Name must be unique within a namespace."},
    {"name": "Ready", "type": "string", "format": "", "priority": 0,
     "description": "The aggregate readiness state of this pod for accepting traffic."},
    {"name": "Status", "type": "string", "format": "", "priority": 0,
     "description": "The aggregate status of the containers in this pod."},
    {"name": "Restarts", "type": "string", "format": "", "priority": 0,
     "description": "The number of times the containers in this pod have been restarted."},
    {"name": "Age", "type": "string", "format": "", "priority": 0,
     "description": "Time since the object was created (creationTimestamp)."},
    {"name": "IP", "type": "string", "format": "", "priority": 1,
     "description": "The pod's IP address (none here: containers are simulated)."},
    {"name": "Node", "type": "string", "format": "", "priority": 1,
     "description": "The node the scheduler put this pod on (spec.nodeName)."},
    {"name": "Nominated Node", "type": "string", "format": "", "priority": 1,
     "description": "A node the scheduler plans for this pod (never, here)."},
    {"name": "Readiness Gates", "type": "string", "format": "", "priority": 1,
     "description": "Extra conditions for readiness (none, here)."},
]
NODE_COLUMNS = [
    {"name": "Name", "type": "string", "format": "name", "priority": 0,
     "description": "Name must be unique."},
    {"name": "Status", "type": "string", "format": "", "priority": 0,
     "description": "The node's Ready condition: Ready, NotReady or Unknown."},
    {"name": "Roles", "type": "string", "format": "", "priority": 0,
     "description": "The roles of the node."},
    {"name": "Age", "type": "string", "format": "", "priority": 0,
     "description": "Time since the controller first showed this node."},
    {"name": "Version", "type": "string", "format": "", "priority": 0,
     "description": "Kubelet version (none: the controller reaches the node over SSH)."},
    {"name": "Internal-IP", "type": "string", "format": "", "priority": 1,
     "description": "The host the controller connects to."},
    {"name": "External-IP", "type": "string", "format": "", "priority": 1,
     "description": "External IP address (none)."},
    {"name": "OS-Image", "type": "string", "format": "", "priority": 1,
     "description": "OS image (unknown)."},
    {"name": "Kernel-Version", "type": "string", "format": "", "priority": 1,
     "description": "Kernel version (unknown)."},
    {"name": "Container-Runtime", "type": "string", "format": "", "priority": 1,
     "description": "How containers are run: a file on the node, over SSH."},
]
EVENT_COLUMNS = [
    {"name": "Last Seen", "type": "string", "format": "", "priority": 0,
     "description": "Time since the event last happened."},
    {"name": "Type", "type": "string", "format": "", "priority": 0, "description": "Normal or Warning."},
    {"name": "Reason", "type": "string", "format": "", "priority": 0, "description": "Why, in one word."},
    {"name": "Object", "type": "string", "format": "", "priority": 0, "description": "What it is about."},
    {"name": "Message", "type": "string", "format": "", "priority": 0, "description": "What happened."},
]


def pod_cells(pod, now):
    """One row of kubectl get pods: NAME READY STATUS RESTARTS AGE IP NODE NOMINATED-NODE READINESS-GATES."""
    ready = "1/1" if pod["status"]["phase"] == "Running" else "0/1"
    return [pod["metadata"]["name"], ready, pod["status"]["phase"], "0", age(pod, now),
            "<none>", pod["spec"].get("nodeName") or "<none>", "<none>", "<none>"]


def node_cells(node, now):
    """One row of kubectl get nodes: NAME STATUS ROLES AGE VERSION INTERNAL-IP ... CONTAINER-RUNTIME."""
    ready = node["status"]["conditions"][0]
    status = {"True": "Ready", "False": "NotReady", "Unknown": "Unknown"}[ready["status"]]
    internal_ip = node["status"]["addresses"][0]["address"]
    return [node["metadata"]["name"], status, "<none>", age(node, now), "<none>",
            internal_ip, "<none>", "<unknown>", "<unknown>",
            node["status"]["nodeInfo"]["containerRuntimeVersion"]]


def event_cells(event, now):
    """One row of kubectl get events: LAST SEEN TYPE REASON OBJECT MESSAGE."""
    involved = event["involvedObject"]
    return [human_duration(now - parse_timestamp(event["lastTimestamp"])), event["type"],
            event["reason"], f'{involved["kind"].lower()}/{involved["name"]}', event["message"]]


CELLS = {"Pod": pod_cells, "Node": node_cells, "Event": event_cells}
COLUMNS = {"Pod": POD_COLUMNS, "Node": NODE_COLUMNS, "Event": EVENT_COLUMNS}


def table_version(accept):
    """The Table apiVersion the Accept header asks for (meta.k8s.io/v1 first), or None for objects."""
    offered = []
    for media_range in accept.split(","):
        parameters = dict(part.strip().partition("=")[::2] for part in media_range.split(";")[1:])
        if parameters.get("as") == "Table" and parameters.get("g") == "meta.k8s.io":
            offered.append(parameters.get("v"))
    if "v1" in offered:
        return "meta.k8s.io/v1"
    if "v1beta1" in offered:
        return "meta.k8s.io/v1beta1"
    return None


def row_object(obj, include_object):
    """What a Table row carries: kubectl -A reads its namespace there. includeObject=Object|Metadata|None."""
    if include_object == "Object":
        return obj
    if include_object == "None":
        return None
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}


def table(kind, objects, resource_version, api_version, include_object, with_columns=True):
    """A meta.k8s.io Table of these objects (what kubectl get prints, with -o wide's columns too)."""
    now = time.time()
    rows = []
    for obj in objects:
        row = {"cells": CELLS[kind](obj, now)}
        carried = row_object(obj, include_object)
        if carried is not None:
            row["object"] = carried
        rows.append(row)
    document = {"kind": "Table", "apiVersion": api_version,
                "metadata": {"resourceVersion": resource_version}, "rows": rows}
    # A watch sends the columns with its first event only, as kube-apiserver does.
    document["columnDefinitions"] = COLUMNS[kind] if with_columns else None
    return document


# ---------------------------------------------------------------------------
# The objects: what a pod and a node look like, made from the backend's plain data
# ---------------------------------------------------------------------------
POD_PHASES = {"running": "Running", "pending": "Pending", "unscheduled": "Pending", "unknown": "Unknown"}


def condition(kind, status, since, reason=None, message=None):
    """One entry of status.conditions (reason and message only when they say something)."""
    entry = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": timestamp(since)}
    if reason:
        entry["reason"] = reason
    if message:
        entry["message"] = message
    return entry


def pod_status(container, since, a_node_is_live=False):
    """A pod's status: phase, conditions and its one container's state, from the backend's word.

    An unscheduled pod is Unschedulable only when no node is live: with one, it is simply
    not placed yet (the loop places it at its next tick, or at the teacher's next step)."""
    name, node, status = container["name"], container["node"], container["status"]
    if status == "unscheduled" and a_node_is_live:
        return {"phase": "Pending", "qosClass": "BestEffort", "conditions": [
            condition("PodScheduled", "False", since, None,
                      "not placed yet: the loop places it at its next tick")]}
    if status == "unscheduled":
        return {"phase": "Pending", "qosClass": "BestEffort", "conditions": [
            condition("PodScheduled", "False", since, "Unschedulable",
                      "no live node to run it on: the loop places it as soon as a node is Ready")]}
    scheduled = [condition("PodScheduled", "True", since), condition("Initialized", "True", since)]
    container_status = {"name": name, "image": SIMULATED_IMAGE, "imageID": "", "restartCount": 0,
                        "ready": status == "running", "started": status == "running"}
    if status == "running":
        conditions = scheduled + [condition("ContainersReady", "True", since), condition("Ready", "True", since)]
        container_status["state"] = {"running": {"startedAt": timestamp(since)}}
    elif status == "unknown":
        message = f"node {node} does not answer: nobody knows if {name} still runs there"
        conditions = scheduled + [condition("ContainersReady", "False", since, "NodeUnreachable", message),
                                  condition("Ready", "False", since, "NodeUnreachable", message)]
        container_status["state"] = {"waiting": {"reason": "NodeUnreachable", "message": message}}
    else:  # pending: on its node, not seen running there yet
        message = f"containers with unready status: [{name}]"
        conditions = scheduled + [condition("ContainersReady", "False", since, "ContainersNotReady", message),
                                  condition("Ready", "False", since, "ContainersNotReady", message)]
        container_status["state"] = {"waiting": {"reason": "ContainerCreating"}}
    return {"phase": POD_PHASES[status], "qosClass": "BestEffort", "conditions": conditions,
            "containerStatuses": [container_status], "startTime": timestamp(since)}


def pod_object(container, uid, created, since, host_ip=None, a_node_is_live=False):
    """A v1 Pod for one container, on the node at host_ip (resourceVersion is added when stored)."""
    spec = {"containers": [{"name": container["name"], "image": SIMULATED_IMAGE}],
            "restartPolicy": "Always", "schedulerName": "pull-mode"}
    host = {}
    if container["node"]:
        spec["nodeName"] = container["node"]
    if container["node"] and host_ip:
        host = {"hostIP": host_ip, "hostIPs": [{"ip": host_ip}]}
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": container["name"], "namespace": NAMESPACE, "uid": uid,
                         "creationTimestamp": timestamp(created)},
            "spec": spec, "status": dict(pod_status(container, since, a_node_is_live), **host)}


# A node has no measured size here; kubectl describe node needs one to print "0 (0%)".
PLACEHOLDER_CAPACITY = {"cpu": "1", "memory": "1Gi", "pods": "110"}
NODE_READY = {  # condition -> (status, reason, message if the backend gives no reason)
    "Ready": ("True", "NodeAnswers", "the node answered the controller's last observation (SSH)"),
    "NotReady": ("False", "NodeFailing", "the node answers, but what the controller asked of it failed"),
    "Unknown": ("Unknown", "NodeStatusUnknown", "the node does not answer the controller (SSH)"),
}


def host_of(address):
    """'10.0.0.2:22' -> '10.0.0.2'; '[::1]:22' -> '::1'."""
    return address.rpartition(":")[0].strip("[]") if ":" in address else address


def node_object(node, uid, created):
    """A v1 Node: its Ready condition (reason, message, since when) and what it runs."""
    status, reason, default_message = NODE_READY[node["condition"]]
    since = node["since"] or created
    ready = condition("Ready", status, since, reason, node["reason"] or default_message)
    ready["lastHeartbeatTime"] = ready["lastTransitionTime"]  # constant, so a quiet node stays quiet
    del ready["lastProbeTime"]
    host = host_of(node["address"])
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": node["name"], "uid": uid, "creationTimestamp": timestamp(created),
                         "labels": {"kubernetes.io/hostname": node["name"]},
                         # What the node's file lists, declared or not (zombies, intruders too).
                         "annotations": {"pull-mode/running": ",".join(node["containers"])}},
            "spec": {},
            "status": {"conditions": [ready],
                       # Placeholders: with none, kubectl describe node divides by zero.
                       "capacity": PLACEHOLDER_CAPACITY, "allocatable": PLACEHOLDER_CAPACITY,
                       "addresses": [{"type": "InternalIP", "address": host},
                                     {"type": "Hostname", "address": node["name"]}],
                       "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                                    "osImage": "", "containerRuntimeVersion": "ssh://" + node["address"],
                                    "kubeletVersion": "", "kubeProxyVersion": "",
                                    "operatingSystem": "linux", "architecture": ""}}}


EVENT_REASONS = {  # the loop's decision -> (Event reason, type)
    "schedule": ("Scheduled", "Normal"),
    "start": ("Started", "Normal"),
    "stop": ("Killing", "Normal"),
    "cleanup": ("NodeLost", "Warning"),
}


def event_object(involved, number, when, reason, kind, message, host=""):
    """A v1 Event about a pod or a node (number: its rank among that object's events)."""
    name = f'{involved["name"]}.{number}'
    return {"kind": "Event", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": involved.get("namespace") or NAMESPACE,
                         "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f'{involved["uid"]}/{number}')),
                         "resourceVersion": "0", "creationTimestamp": timestamp(when)},
            "involvedObject": {"kind": involved["kind"], "apiVersion": "v1", "name": involved["name"],
                               "namespace": involved.get("namespace", ""), "uid": involved["uid"]},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": timestamp(when), "lastTimestamp": timestamp(when), "eventTime": None,
            "source": {"component": "pull-mode", "host": host or ""},
            "reportingComponent": "pull-mode", "reportingInstance": ""}


def pod_events(pod, records):
    """A pod's events, from the loop's decisions about it: Scheduled, Started, Killing, NodeLost."""
    involved = {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": NAMESPACE,
                "uid": pod["metadata"]["uid"]}
    events = []
    for number, record in enumerate(sorted(records, key=lambda record: record["time"])):
        reason, kind = EVENT_REASONS.get(record["kind"], (record["kind"], "Normal"))
        events.append(event_object(involved, number, record["time"], reason, kind, record["message"],
                                   record.get("node")))
    return events


def node_event(node):
    """A node's one event: its Ready condition's last change (Kubernetes' NodeReady, NodeNotReady)."""
    ready, name = node["status"]["conditions"][0], node["metadata"]["name"]
    reason = {"True": "NodeReady", "False": "NodeNotReady", "Unknown": "NodeStatusUnknown"}[ready["status"]]
    # kubectl describe node asks for events with involvedObject.uid = the node's name.
    involved = {"kind": "Node", "name": name, "namespace": "", "uid": name}
    message = f'Node {name} status is now: {reason} ({ready.get("message", "")})'
    return event_object(involved, 0, parse_timestamp(ready["lastTransitionTime"]), reason,
                        "Normal" if reason == "NodeReady" else "Warning", message, name)


def without_version(obj):
    """The object without its resourceVersion: two renderings are the same change-wise if these are equal."""
    copy = dict(obj, metadata=dict(obj["metadata"]))
    copy["metadata"].pop("resourceVersion", None)
    return copy


# ---------------------------------------------------------------------------
# Discovery and OpenAPI: what kubectl reads before anything else
# ---------------------------------------------------------------------------
API_RESOURCES = {
    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
    "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["create", "delete", "get", "list", "patch", "watch"],
         "shortNames": ["po"], "categories": ["all"]},
        {"name": "nodes", "singularName": "node", "namespaced": False, "kind": "Node",
         "verbs": ["get", "list", "watch"], "shortNames": ["no"]},
        {"name": "events", "singularName": "event", "namespaced": True, "kind": "Event",
         "verbs": ["get", "list"], "shortNames": ["ev"]},
    ],
}


def openapi_operation(kind):
    """A PATCH operation for `kind` that accepts ?fieldValidation: kubectl then validates on the server."""
    return {"patch": {"x-kubernetes-group-version-kind": {"group": "", "version": "v1", "kind": kind},
                      "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                      "responses": {"200": {"description": "OK"}}}}


# kubectl create/apply first ask /openapi/v3/api/v1 whether the server validates fields
# (a fieldValidation query parameter on the kind's PATCH). Yes: kubectl sends
# ?fieldValidation=Strict and checks nothing itself. Without this document it refuses.
OPENAPI_V1 = {
    "openapi": "3.0.0",
    "info": {"title": "pull-mode", "version": "v1.37.0-pull-mode"},
    "paths": {"/api/v1/namespaces/{namespace}/pods/{name}": openapi_operation("Pod"),
              "/api/v1/nodes/{name}": openapi_operation("Node")},
    "components": {"schemas": {}},
}
OPENAPI_V1_HASH = "pull-mode-1"  # changes when OPENAPI_V1 does (kubectl caches by it)

# Fields a Pod may have at the top and in its metadata; with ?fieldValidation=Strict
# another one is an error (a typo like "spce:"), as in Kubernetes.
POD_FIELDS = {"apiVersion", "kind", "metadata", "spec", "status"}
METADATA_FIELDS = {"name", "generateName", "namespace", "labels", "annotations", "uid", "resourceVersion",
                   "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation",
                   "ownerReferences", "finalizers", "managedFields", "selfLink"}


class KubernetesAPI:
    """The Kubernetes face of one Flask app: its last view of the cluster, its event log, its watchers."""

    def __init__(self, backend, history_limit=HISTORY_LIMIT, keepalive_seconds=KEEPALIVE_SECONDS):
        self.backend = backend
        self.history_limit = history_limit
        self.keepalive_seconds = keepalive_seconds
        # One lock for all of it; a Condition, so that watchers sleep until an event comes.
        self.condition = threading.Condition()
        # Versions start from the clock, so a version from before a restart is older than
        # any this run makes: a client that kept one gets 410 Gone, and lists again.
        self.version = int(time.time() * 1000)
        self.objects = {}  # (kind, name) -> the object as last shown, with its resourceVersion
        self.signatures = {}  # (kind, name) -> the backend's words it was made from
        self.history = deque()  # (version, type, old object or None, new object or None)
        self.forgotten_up_to = self.version  # a watch from a version before this cannot be replayed
        self.watcher_threads = set()  # the threads streaming a watch right now (end_watches waits for them)
        self.closing = False  # set when the process ends: every watch ends its stream properly

    # -- the view of the cluster ----------------------------------------------

    def changed(self):
        """The loop calls this after each tick: look at the backend again; watchers see what differs."""
        return self.refresh()

    def refresh(self):
        """Render pods and nodes from the backend, number what differs, wake the watchers. Returns the version."""
        with self.condition:
            # The backend is asked inside the lock: two requests refreshing at once must not
            # store an older answer after a newer one (a watcher would see time go backwards).
            containers = self.backend.containers()
            nodes = self.backend.nodes()
            now = time.time()
            hosts = {node["name"]: host_of(node["address"]) for node in nodes}
            a_node_is_live = any(node["condition"] == "Ready" for node in nodes)
            seen = set()
            for container in containers:
                key = ("Pod", container["name"])
                seen.add(key)
                host_ip = hosts.get(container["node"])
                # What a pod is made of: unchanged, it is the object last shown, not rendered
                # again (a tick then costs microseconds per pod, not a rendering of each).
                signature = (container["node"], container["status"], host_ip, a_node_is_live)
                if self.signatures.get(key) == signature:
                    continue
                self.signatures[key] = signature
                previous = self.objects.get(key)
                uid, created = self.identity(previous, now)
                same_state = previous is not None and previous["status"]["phase"] == POD_PHASES[
                    container["status"]] and field_value(previous, "spec.nodeName") == (container["node"] or "")
                since = self.since_of(previous) if same_state else now  # when its current state began
                self.store(key, pod_object(container, uid, created, since, host_ip, a_node_is_live))
            for node in nodes:
                key = ("Node", node["name"])
                seen.add(key)
                signature = (node["condition"], node["reason"], node["since"], tuple(node["containers"]),
                             node["address"])
                if self.signatures.get(key) == signature:
                    continue
                self.signatures[key] = signature
                uid, created = self.identity(self.objects.get(key), now)
                self.store(key, node_object(node, uid, created))
            for key in [key for key in self.objects if key not in seen]:
                self.signatures.pop(key, None)
                self.record("DELETED", self.objects.pop(key), None)
            self.condition.notify_all()
            return str(self.version)

    def identity(self, previous, now):
        """(uid, creation time) of an object: kept from its last rendering, or new ones."""
        if previous is None:
            return str(uuid.uuid4()), now
        return previous["metadata"]["uid"], parse_timestamp(previous["metadata"]["creationTimestamp"])

    def since_of(self, pod):
        """When a pod entered its current state (its first condition's lastTransitionTime)."""
        return parse_timestamp(pod["status"]["conditions"][0]["lastTransitionTime"])

    def store(self, key, obj):
        """Keep the new rendering of an object; if it differs from the last one, number it as an event."""
        previous = self.objects.get(key)
        if previous is not None and without_version(previous) == obj:
            return
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects[key] = obj
        self.record("ADDED" if previous is None else "MODIFIED", previous, obj)

    def record(self, kind, old, new):
        """Append an event to the history (a DELETED one takes a new version); drop the oldest past the limit."""
        if kind == "DELETED":
            self.version += 1
            old = dict(old, metadata=dict(old["metadata"], resourceVersion=str(self.version)))
        self.history.append((self.version, kind, old, new))
        while len(self.history) > self.history_limit:
            self.forgotten_up_to = self.history.popleft()[0]

    def current(self, kind):
        """The objects of one kind, as last shown, sorted by name, and the version they are as of."""
        version = self.refresh()
        with self.condition:
            objects = [obj for (each, _), obj in sorted(self.objects.items()) if each == kind]
        return objects, version

    # -- answering kubectl --------------------------------------------------------

    def discovery_root(self):
        """GET /api: the core group's versions (only v1)."""
        return json_response({"kind": "APIVersions", "versions": ["v1"],
                              "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                              "serverAddress": request.host}]})

    def discovery_groups(self):
        """GET /apis: no named groups (no deployments, no leases): only the core group at /api."""
        return json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})

    def discovery_resources(self):
        """GET /api/v1: pods (po), nodes (no) and events (ev), with what each supports."""
        return json_response(API_RESOURCES)

    def server_version(self):
        """GET /version: what kubectl version prints as Server Version."""
        return json_response(SERVER_VERSION)

    def openapi_index(self):
        """GET /openapi/v3: where the document of each group-version is (only api/v1)."""
        return json_response({"paths": {"api/v1": {
            "serverRelativeURL": f"/openapi/v3/api/v1?hash={OPENAPI_V1_HASH}"}}})

    def openapi_v1(self):
        """GET /openapi/v3/api/v1: just enough OpenAPI for kubectl's validation (see OPENAPI_V1)."""
        return json_response(OPENAPI_V1)

    def list_or_watch(self, kind, namespace=None):
        """GET a collection: a list (a Table for kubectl get), or, with ?watch=true, a stream of events."""
        args = request.args
        field_terms = parse_field_selector(args.get("fieldSelector", ""), kind)
        if namespace is not None and kind in ("Pod", "Event"):
            field_terms.append(("metadata.namespace", namespace, True))
        label_requirements = parse_label_selector(args.get("labelSelector", ""))
        if args.get("watch") in ("true", "1"):
            if kind == "Event":
                raise KubernetesError(405, "MethodNotAllowed", "events cannot be watched here: list them")
            return self.watch(kind, field_terms, label_requirements)
        if kind == "Event":
            objects, version = self.events(field_terms), self.refresh()
        else:
            objects, version = self.current(kind)
        objects = [obj for obj in objects if matches(obj, field_terms, label_requirements)]
        api_version = table_version(request.headers.get("Accept", ""))
        if api_version:
            return json_response(table(kind, objects, version, api_version,
                                       args.get("includeObject", "Metadata")))
        return json_response({"kind": kind + "List", "apiVersion": "v1",
                              "metadata": {"resourceVersion": version}, "items": objects})

    def get_one(self, kind, name, namespace=None):
        """GET one pod or node: the object (-o yaml), or a one-row Table (kubectl get pod x)."""
        if namespace not in (None, NAMESPACE):
            raise not_found(kind, name)
        objects, version = self.current(kind)
        found = [obj for obj in objects if obj["metadata"]["name"] == name]
        if not found:
            raise not_found(kind, name)
        api_version = table_version(request.headers.get("Accept", ""))
        if api_version:
            return json_response(table(kind, found, version, api_version,
                                       request.args.get("includeObject", "Metadata")))
        return json_response(found[0])

    def get_namespace(self, namespace):
        """The namespace default (Active); any other one is not found."""
        if namespace != NAMESPACE:
            raise KubernetesError(404, "NotFound", f'namespaces "{namespace}" not found',
                                  name=namespace, kind="namespaces")
        return json_response({"kind": "Namespace", "apiVersion": "v1",
                              "metadata": {"name": NAMESPACE, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, NAMESPACE)),
                                           "creationTimestamp": timestamp(0)},
                              "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})

    def events(self, field_terms):
        """The events of every pod (the loop's decisions) and node (its last condition change)."""
        with_pods, _ = self.current("Pod")
        with_nodes, _ = self.current("Node")
        timed = []  # (when, event): sorted on the exact time, the events show it to the second
        for pod in with_pods:
            records = self.backend.events(pod["metadata"]["name"])
            timed += zip(sorted(record["time"] for record in records), pod_events(pod, records))
        timed += [(parse_timestamp(node["status"]["conditions"][0]["lastTransitionTime"]), node_event(node))
                  for node in with_nodes]
        timed.sort(key=lambda pair: pair[0])
        return [event for _, event in timed if matches(event, field_terms, [])]

    # -- watches ------------------------------------------------------------------

    def watch(self, kind, field_terms, label_requirements):
        """Start a watch: check its options now (errors are plain answers), then stream its events."""
        args = request.args
        api_version = table_version(request.headers.get("Accept", ""))
        include_object = args.get("includeObject", "Metadata")
        timeout = args.get("timeoutSeconds", "")
        if timeout and not timeout.isdigit():
            raise KubernetesError(400, "BadRequest", f"timeoutSeconds {timeout!r} is not a whole number of seconds")
        timeout = min(int(timeout or WATCH_SECONDS_DEFAULT), WATCH_SECONDS_DEFAULT)
        send_initial = args.get("sendInitialEvents") == "true"
        if send_initial and args.get("resourceVersionMatch") != "NotOlderThan":
            raise KubernetesError(422, "Invalid", "sendInitialEvents=true requires resourceVersionMatch=NotOlderThan")
        bookmarks = args.get("allowWatchBookmarks") == "true"
        since = args.get("resourceVersion", "")
        self.refresh()
        with self.condition:
            if since in ("", "0") or send_initial:
                # "Give me everything, then the changes": the current objects as ADDED events.
                start = self.version
                initial = [obj for (each, _), obj in sorted(self.objects.items()) if each == kind]
            else:
                if not since.isdigit():
                    raise KubernetesError(400, "BadRequest", f"resourceVersion {since!r} is not a number")
                start, initial = int(since), []
                if start < self.forgotten_up_to or start > self.version:
                    raise expired(start, self.forgotten_up_to)
        selection = (field_terms, label_requirements)
        stream = self.stream(kind, selection, start, initial, api_version, include_object,
                             timeout, send_initial, bookmarks)
        return Response(stream, mimetype=JSON)

    def stream(self, kind, selection, start, initial, api_version, include_object, timeout,
               send_initial, bookmarks):
        """Yield a watch's events, one JSON per line, until its timeout or until its client leaves."""
        thread = threading.current_thread()
        with self.condition:
            self.watcher_threads.add(thread)
        encode = WatchEncoder(kind, api_version, include_object)
        deadline = time.monotonic() + timeout
        try:
            for obj in initial:
                if matches(obj, *selection):
                    yield encode.event("ADDED", obj)
            if send_initial:
                # The end of the initial events: kubectl's wait --for=delete waits for this bookmark.
                yield encode.bookmark(start, initial_events_end=True)
            seen_up_to = start
            last_write = time.monotonic()
            while time.monotonic() < deadline and not self.closing:
                with self.condition:
                    if not self.history or self.history[-1][0] <= seen_up_to:
                        self.condition.wait(min(self.keepalive_seconds, max(0.0, deadline - time.monotonic())))
                    fell_behind = seen_up_to < self.forgotten_up_to  # events it needs were dropped
                    oldest = self.forgotten_up_to
                    new_events = [event for event in self.history if event[0] > seen_up_to]
                if fell_behind:
                    yield encode.error(expired(seen_up_to, oldest))
                    return
                for version, change, old, new in new_events:
                    seen_up_to = version
                    line = encode.change(change, old, new, selection) if (old or new)["kind"] == kind else None
                    if line:
                        yield line
                        last_write = time.monotonic()
                if time.monotonic() - last_write >= self.keepalive_seconds:
                    # Nothing said for a while: a newline (JSON readers skip it) or a bookmark.
                    # If the client left, this write fails and the server closes this generator.
                    yield encode.bookmark(seen_up_to) if bookmarks else b"\n"
                    last_write = time.monotonic()
        finally:
            with self.condition:
                self.watcher_threads.discard(thread)
                self.condition.notify_all()  # end_watches() may be waiting for the last one

    def end_watches(self, wait=1.0):
        """End every watch properly (the last chunk written), so that a kubectl get -w sees the
        watch closed and exits quietly, instead of a cut connection it would retry. Called
        when the process ends (atexit), while the request threads still run."""
        deadline = time.monotonic() + wait
        with self.condition:
            self.closing = True
            self.condition.notify_all()
            while self.watcher_threads and time.monotonic() < deadline:
                self.condition.wait(max(0.0, deadline - time.monotonic()))

    # -- writes -------------------------------------------------------------------

    def check_may_write(self):
        """Refuse a change without the controller's token (when it has one). Reads stay open."""
        if self.backend.may_write(request.headers.get("Authorization", "")):
            return
        raise KubernetesError(
            401, "Unauthorized",
            "changing the cluster needs the controller's token (its API_TOKEN), and kubectl sends a "
            "token only over https: over this plain http, kubectl is read-only. Make changes with "
            "curl -H 'Authorization: Bearer <token>' on /api/containers, or on the classroom page")

    def create_pod(self, namespace):
        """POST a pod (kubectl run, kubectl create -f, client-side apply of a new pod): declare it."""
        self.check_may_write()  # who you are comes first, as in Kubernetes: 401 before 422
        check_write_namespace(namespace)
        pod = read_body()
        name = pod_name(pod, namespace, url_name=None)
        warnings = ignored_fields_warnings(pod, name, request.args.get("fieldValidation", ""))
        if not is_dry_run() and not self.backend.declare(name):
            raise KubernetesError(409, "AlreadyExists", f'pods "{name}" already exists', name=name, kind="pods")
        return json_response(self.pod_after_write(name), 201, warnings)

    def patch_pod(self, namespace, name):
        """PATCH a pod: kubectl apply, server-side (an apply patch) or client-side; other patches: 405."""
        self.check_may_write()
        check_write_namespace(namespace)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type == "application/apply-patch+yaml":
            return self.apply_pod(name)
        if request.args.get("fieldManager") == "kubectl-client-side-apply":
            return self.reapply_pod(name)
        raise KubernetesError(
            405, "MethodNotAllowed",
            f'pods "{name}" cannot be patched: pull-mode keeps only a pod\'s name, so there is '
            f"nothing to change (kubectl apply -f FILE is accepted, and changes nothing), "
            f"or delete the pod and create it again", name=name, kind="pods")

    def apply_pod(self, name):
        """kubectl apply --server-side: declare the pod if it is new, else keep it as it is."""
        pod = read_body()
        name = pod_name(pod, NAMESPACE, url_name=name)
        warnings = ignored_fields_warnings(pod, name, request.args.get("fieldValidation", ""))
        created = False if is_dry_run() else self.backend.declare(name)
        if not created:
            warnings.append(f"pod {name} was already declared: nothing changed")
        return json_response(self.pod_after_write(name), 201 if created else 200, warnings)

    def reapply_pod(self, name):
        """kubectl apply -f on a pod that exists: its patch says how it differs; only the name counts."""
        read_body()  # a strategic merge patch: checked to be JSON, then dropped
        objects, _ = self.current("Pod")
        if not any(obj["metadata"]["name"] == name for obj in objects):
            raise not_found("Pod", name)
        return json_response(self.pod_after_write(name), 200,
                             [f"pod {name} was already declared: nothing changed (pull-mode keeps only "
                              f"the name, so kubectl's last-applied annotation is not kept either)"])

    def delete_pod(self, namespace, name):
        """DELETE a pod (kubectl delete pod x): forget it; the loop stops it on its node."""
        self.check_may_write()
        check_write_namespace(namespace)
        objects, _ = self.current("Pod")
        last_seen = next((obj for obj in objects if obj["metadata"]["name"] == name), None)
        if is_dry_run():
            forgotten = last_seen is not None
        else:
            forgotten = self.backend.forget(name)
        if not forgotten:
            raise not_found("Pod", name)
        self.refresh()
        # The pod as it was: kubectl prints 'pod "x" deleted', then waits until a GET says 404.
        return json_response(last_seen or {"kind": "Pod", "apiVersion": "v1",
                                           "metadata": {"name": name, "namespace": NAMESPACE}})

    def pod_after_write(self, name):
        """The pod as it is now, after a write (or as a dry run would make it: unscheduled)."""
        objects, _ = self.current("Pod")
        for obj in objects:
            if obj["metadata"]["name"] == name:
                return obj
        now = time.time()  # a dry run: not declared, so not in the view
        return pod_object({"name": name, "node": None, "status": "unscheduled"}, str(uuid.uuid4()), now, now)


class WatchEncoder:
    """Turns one watch's events into lines: objects, or Table rows (columns on the first row only)."""

    def __init__(self, kind, api_version, include_object):
        self.kind, self.api_version, self.include_object = kind, api_version, include_object
        self.columns_sent = False

    def event(self, change, obj):
        """One line: {"type": ..., "object": ...}."""
        if self.api_version:
            obj = table(self.kind, [obj], obj["metadata"]["resourceVersion"], self.api_version,
                        self.include_object, with_columns=not self.columns_sent)
            self.columns_sent = True
        return (json.dumps({"type": change, "object": obj}) + "\n").encode()

    def change(self, change, old, new, selection):
        """The line for one change, as this watcher's selectors see it (None: not its business).

        A pod that moves out of a selection (say, spec.nodeName=node-1) is DELETED for
        this watcher, one that moves in is ADDED, as kube-apiserver does."""
        was_in = old is not None and matches(old, *selection)
        is_in = new is not None and matches(new, *selection)
        if change == "DELETED":
            return self.event("DELETED", old) if was_in else None
        if was_in and is_in:
            return self.event("MODIFIED", new)
        if is_in:
            return self.event("ADDED", new)
        if was_in:
            return self.event("DELETED", new)
        return None

    def bookmark(self, version, initial_events_end=False):
        """A BOOKMARK: "nothing new up to this version"; the first one may end the initial events."""
        metadata = {"resourceVersion": str(version)}
        if initial_events_end:
            metadata["annotations"] = {INITIAL_EVENTS_END: "true"}
        return (json.dumps({"type": "BOOKMARK", "object": {"kind": self.kind, "apiVersion": "v1",
                                                           "metadata": metadata}}) + "\n").encode()

    def error(self, error):
        """An ERROR event carrying a Status (a watcher that fell behind: 410 Expired)."""
        status = status_object(error.code, error.reason, error.message)
        return (json.dumps({"type": "ERROR", "object": status}) + "\n").encode()


def not_found(kind, name):
    """The 404 kubectl prints as 'Error from server (NotFound): pods "x" not found'."""
    resource = kind.lower() + "s"
    return KubernetesError(404, "NotFound", f'{resource} "{name}" not found', name=name, kind=resource)


def expired(version, oldest):
    """410 Gone: that version is too old to replay (or from before a restart): list again."""
    return KubernetesError(410, "Expired", f"too old resource version: {version} ({oldest})")


def check_write_namespace(namespace):
    """Writes go to namespace default only: pull-mode has no other."""
    if namespace != NAMESPACE:
        raise KubernetesError(405, "MethodNotAllowed",
                              f'namespace "{namespace}": pull-mode runs containers in namespace '
                              f'"{NAMESPACE}" only (leave out -n, or use -n {NAMESPACE})')


def is_dry_run():
    """kubectl --dry-run=server sends ?dryRun=All: check everything, change nothing."""
    return request.args.get("dryRun") == "All"


def read_body():
    """The request's JSON object (kubectl sends JSON, even for an apply patch), or a 400."""
    try:
        body = json.loads(request.get_data(as_text=True) or "null")
    except ValueError:
        raise KubernetesError(400, "BadRequest", "the body must be a JSON object (a Pod)") from None
    if not isinstance(body, dict):
        raise KubernetesError(400, "BadRequest", "the body must be a JSON object (a Pod)")
    return body


def pod_name(pod, namespace, url_name):
    """The pod's name from its body (or generateName), checked: kind, namespace, DNS-1123."""
    if pod.get("kind", "Pod") != "Pod" or pod.get("apiVersion", "v1") != "v1":
        raise KubernetesError(400, "BadRequest", f'expected a v1 Pod, got {pod.get("apiVersion")} '
                              f'{pod.get("kind")}: pull-mode serves pods and nodes only')
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    if metadata.get("namespace") not in (None, "", namespace):
        raise KubernetesError(400, "BadRequest", "the namespace of the provided object does not match "
                                                 "the namespace sent on the request")
    name = metadata.get("name") or ""
    if not name and metadata.get("generateName") and url_name is None:
        # generateName: "web-" -> "web-x7k2q", as Kubernetes does (5 letters and digits).
        name = metadata["generateName"] + "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
    if url_name is not None and name != url_name:
        raise KubernetesError(400, "BadRequest", f'the name of the object ({name}) does not match '
                                                 f'the name on the URL ({url_name})')
    if not name:
        raise KubernetesError(422, "Invalid", 'Pod "" is invalid: metadata.name: Required value: name or '
                                              'generateName is required', kind="Pod",
                              causes=[{"reason": "FieldValueRequired", "message": "Required value: name "
                                       "or generateName is required", "field": "metadata.name"}])
    problem = invalid_name_message(name) if isinstance(name, str) else "must be a string"
    if problem:
        invalid = f'Invalid value: "{name}": {problem}'
        raise KubernetesError(422, "Invalid", f'Pod "{name}" is invalid: metadata.name: {invalid}',
                              name=name, kind="Pod",
                              causes=[{"reason": "FieldValueInvalid", "message": invalid, "field": "metadata.name"}])
    return name


def ignored_fields_warnings(pod, name, field_validation):
    """The warnings for what was sent beyond the name (kept by no one); unknown fields: 400 if Strict."""
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    unknown = sorted(f'"{key}"' for key in pod if key not in POD_FIELDS)
    unknown += sorted(f'"metadata.{key}"' for key in metadata if key not in METADATA_FIELDS)
    if unknown and field_validation == "Strict":
        raise KubernetesError(400, "BadRequest", f'Pod in version "v1" cannot be handled as a Pod: '
                                                 f'strict decoding error: unknown field {", ".join(unknown)}')
    warnings = [f"unknown field {field}" for field in unknown] if field_validation == "Warn" else []
    ignored = []
    spec = pod.get("spec") if isinstance(pod.get("spec"), dict) else {}
    for container in spec.get("containers") or []:
        if isinstance(container, dict) and container.get("image"):
            ignored.append(f'image {container["image"]}')
    ignored += [f"metadata.{key}" for key in ("labels", "annotations") if metadata.get(key)]
    ignored += [f"spec.{key}" for key in sorted(spec) if key != "containers"]
    if ignored or spec.get("containers"):
        what = ", ".join(ignored) if ignored else "spec.containers"
        warnings.append(f"pull-mode keeps only the name {name}: {what} accepted but not run "
                        f"(a container here is only a name)")
    return warnings


# ---------------------------------------------------------------------------
# The routes, on the app: Kubernetes' paths beside the controller's own
# ---------------------------------------------------------------------------
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def register(app, backend, **options):
    """Add the Kubernetes API to a Flask app; returns the KubernetesAPI, whose changed() the loop calls.

    Only these paths are taken: /api (exactly), /api/v1 and below, /apis and below,
    /version, /openapi/v2, /openapi/v3 and below. /api/containers and the rest stay the app's."""
    kubernetes = KubernetesAPI(backend, **options)
    routes = Blueprint("kubernetes", __name__)

    def only(method, handler, *args):
        """Call handler for this method; any other method is a 405 Status (never Flask's HTML)."""
        if request.method != method:
            raise KubernetesError(405, "MethodNotAllowed",
                                  f"{request.method} is not supported on {request.path} (only {method})")
        return handler(*args)

    # Discovery, the version and the OpenAPI documents: GET only, one view each.
    for path, view in [("/api", kubernetes.discovery_root),           # the core group
                       ("/apis", kubernetes.discovery_groups),        # the other groups (none)
                       ("/api/v1", kubernetes.discovery_resources),   # the core group's resources
                       ("/version", kubernetes.server_version),
                       ("/openapi/v3", kubernetes.openapi_index),     # the index of documents
                       ("/openapi/v3/api/v1", kubernetes.openapi_v1)]:  # the core group's document
        routes.add_url_rule(path, view.__name__, functools.partial(only, "GET", view),
                            methods=ALL_METHODS)

    @routes.route("/api/v1/pods", methods=ALL_METHODS)
    def all_pods():
        """GET /api/v1/pods: the pods of every namespace (kubectl get pods -A)."""
        return only("GET", kubernetes.list_or_watch, "Pod")

    @routes.route("/api/v1/namespaces/<namespace>/pods", methods=ALL_METHODS)
    def pods(namespace):
        """GET: list or watch the pods; POST: create one."""
        if request.method == "POST":
            return kubernetes.create_pod(namespace)
        return only("GET", kubernetes.list_or_watch, "Pod", namespace)

    @routes.route("/api/v1/namespaces/<namespace>/pods/<name>", methods=ALL_METHODS)
    def pod(namespace, name):
        """GET, DELETE, or PATCH (server-side apply) one pod. PUT: 405."""
        if request.method == "DELETE":
            return kubernetes.delete_pod(namespace, name)
        if request.method == "PATCH":
            return kubernetes.patch_pod(namespace, name)
        if request.method == "PUT":
            raise KubernetesError(405, "MethodNotAllowed",
                                  f'pods "{name}" cannot be replaced: pull-mode keeps only a pod\'s name. '
                                  f"Delete it and create it again", name=name, kind="pods")
        return only("GET", kubernetes.get_one, "Pod", name, namespace)

    @routes.route("/api/v1/namespaces/<namespace>/pods/<name>/<subresource>", methods=ALL_METHODS)
    def pod_subresource(namespace, name, subresource):
        """pods/x/log, /exec, /status...: a simulated container has none of them."""
        raise KubernetesError(405, "MethodNotAllowed",
                              f"pods/{subresource} is not supported: a pull-mode container is only a name "
                              f"(no logs, no exec, no status updates)", name=name, kind="pods")

    @routes.route("/api/v1/namespaces/<namespace>", methods=ALL_METHODS)
    def namespace_object(namespace):
        """GET a namespace: kubectl asks after a NotFound in another namespace. Only default exists."""
        return only("GET", kubernetes.get_namespace, namespace)

    @routes.route("/api/v1/nodes", methods=ALL_METHODS)
    def nodes():
        """GET: list or watch the nodes. Nodes come from the controller's settings: no POST."""
        if request.method == "POST":
            raise KubernetesError(405, "MethodNotAllowed",
                                  "nodes cannot be created here: they are the controller's NODES setting",
                                  kind="nodes")
        return only("GET", kubernetes.list_or_watch, "Node")

    @routes.route("/api/v1/nodes/<name>", methods=ALL_METHODS)
    @routes.route("/api/v1/nodes/<name>/<path:subresource>", methods=ALL_METHODS)
    def node(name, subresource=None):
        """GET one node. Deleting, replacing or patching a node: 405 (nodes are the NODES setting)."""
        if request.method != "GET" or subresource:
            raise KubernetesError(405, "MethodNotAllowed",
                                  f'nodes "{name}" cannot be changed or deleted here: the nodes are the '
                                  f"controller's NODES setting (change it, then restart the controller)",
                                  name=name, kind="nodes")
        return kubernetes.get_one("Node", name)

    @routes.route("/api/v1/events", methods=ALL_METHODS)
    def all_events():
        """GET /api/v1/events: every event (kubectl get events -A)."""
        return only("GET", kubernetes.list_or_watch, "Event")

    @routes.route("/api/v1/namespaces/<namespace>/events", methods=ALL_METHODS)
    def events(namespace):
        """GET the events of a namespace (what kubectl describe shows at the bottom)."""
        return only("GET", kubernetes.list_or_watch, "Event", namespace)

    @routes.route("/api/v1/<path:rest>", methods=ALL_METHODS)
    @routes.route("/apis/<path:rest>", methods=ALL_METHODS)
    @routes.route("/openapi/<path:rest>", methods=ALL_METHODS)
    def unknown(rest):
        """Any other Kubernetes path: a JSON 404 Status, never an HTML page."""
        raise KubernetesError(404, "NotFound", f"the server could not find the requested resource "
                                               f"({request.path}): pull-mode serves pods, nodes and events")

    @routes.errorhandler(KubernetesError)
    def kubernetes_error(error):
        """A KubernetesError -> its Status, with its HTTP code."""
        return json_response(status_object(error.code, error.reason, error.message,
                                           error.name, error.kind, error.causes), error.code)

    @routes.errorhandler(HTTPException)
    def http_error(error):
        """Flask's own errors here (413: body too large...) as a Status too."""
        reason = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed",
                  413: "RequestEntityTooLarge"}.get(error.code, "BadRequest")
        return json_response(status_object(error.code, reason, error.description), error.code)

    @routes.errorhandler(Exception)
    def internal_error(error):
        """A bug, or the backend failed: a 500 Status, so kubectl says what (no HTML, no traceback)."""
        app.logger.exception("kubernetes API: %s %s", request.method, request.path)
        return json_response(status_object(500, "InternalError", f"internal error: {error}"), 500)

    app.register_blueprint(routes)
    app.extensions["kubernetes_api"] = kubernetes
    atexit.register(kubernetes.end_watches)
    backend.when_changed(kubernetes.changed)
    return kubernetes


# ---------------------------------------------------------------------------
# The controller's backend: the same desired_state.txt, observations and decisions as
# curl and the classroom page
# ---------------------------------------------------------------------------
# What each of the loop's decisions says in kubectl describe's Events (cleanup: why).
CLEANUP_WORDS = {"down": "does not answer", "not_ready": "is not ready",
                 "unknown_node": "is not one of the controller's NODES"}


class ControllerBackend:
    """The backend for app_controller.py, made of the objects it holds (see machinery.py).

    declare and forget are the lesson's own changes of desired_state.txt (they abort with
    409 and 404): a pod made by kubectl is declared exactly as a POST /api/containers is."""

    def __init__(self, desired_file, status, log, timer, token, declare, forget):
        self.desired_file, self.status, self.log, self.timer = desired_file, status, log, timer
        self.token, self.declare_change, self.forget_change = token, declare, forget

    def containers(self):
        """What GET /api/containers shows."""
        desired, _ = self.desired_file.read()
        return self.status.container_views(desired)

    def nodes(self):
        """What GET /api/nodes shows."""
        return self.status.node_views()

    def declare(self, name):
        """Declare the container, then wake the loop; False if it was declared already."""
        return self.change(self.declare_change, name)

    def forget(self, name):
        """Forget the container, then wake the loop (it stops it); False if it was not declared."""
        return self.change(self.forget_change, name)

    def change(self, change, name):
        """desired_file.update(change, name): True if it changed the file, False on its 409 or 404."""
        try:
            self.desired_file.update(change, name)
        except (Conflict, NotFound):
            return False
        except EditedMeanwhile as error:
            raise KubernetesError(409, "Conflict", str(error), name=name, kind="pods") from None
        self.timer.wake()
        return True

    def events(self, name):
        """The loop's decisions about one container, in the ticks the controller still keeps."""
        events = []
        for tick in self.log.recent_ticks():
            when, decisions = tick["started_at"], tick["decisions"]
            for cleanup in decisions["cleanup"]:
                if cleanup["name"] == name:
                    events.append({"time": when, "kind": "cleanup", "node": cleanup["node"], "message":
                                   f'node {cleanup["node"]} {CLEANUP_WORDS.get(cleanup["why"], cleanup["why"])}: '
                                   f"{name} is unassigned, to be placed again"})
            for placed in decisions["schedule"]:
                if placed["name"] == name:
                    loads = ", ".join(f"{node}: {load}" for node, load in placed["loads"].items())
                    events.append({"time": when, "kind": "schedule", "node": placed["node"], "message":
                                   f'Successfully assigned {NAMESPACE}/{name} to {placed["node"]} '
                                   f"(the live node with the fewest containers; {loads})"})
            for acted in decisions["reconcile"]:
                failed = "" if acted["ok"] else f' (failed: {acted["error"]}; retried next tick)'
                if name in acted["start"]:
                    events.append({"time": when, "kind": "start", "node": acted["node"],
                                   "message": f'Started {name} on {acted["node"]}{failed}'})
                if name in acted["stop"]:
                    events.append({"time": when, "kind": "stop", "node": acted["node"], "message":
                                   f'Stopping {name} on {acted["node"]}: not wanted there{failed}'})
        return events

    def may_write(self, authorization):
        """The controller's own token check: the same as for curl."""
        return token_allows(self.token, authorization)

    def when_changed(self, callback):
        """The loop's log calls it at the end of every tick."""
        self.log.after_tick.append(callback)
