"""Kubernetes NetworkPolicy semantics (networking.k8s.io/v1), evaluated offline, so that tests can
ask of the manifests "may this pod open a connection to that one on this port?".

What it follows (the API reference's rules, not any one network plugin's extras):

- a pod is isolated for ingress (egress) when some policy of its namespace selects it and lists
  that direction in ``policyTypes`` (omitted: Ingress always, Egress when it has egress rules);
  an isolated pod accepts (sends) only what some rule of such a policy allows;
- a rule allows a peer when its ``from``/``to`` is empty or one of its peers matches, and a port
  when its ``ports`` is empty or one entry matches (numbers only here; a named port is refused,
  as the manifests do not use them);
- a peer with ``podSelector`` alone means pods of the policy's namespace, with
  ``namespaceSelector`` alone every pod of the matching namespaces, with both the matching pods
  of the matching namespaces; ``ipBlock`` matches only endpoints that are not pods;
- a connection needs the sender's egress and the receiver's ingress.

Invariant: it never answers "allowed" for a case it does not model; it raises instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Endpoint:
    """A pod (labels, its namespace and that namespace's labels), or, with ``pod=False``,
    something that is not a pod (an address outside the cluster, a DNS server on a node)."""

    name: str
    labels: dict = field(default_factory=dict)
    namespace: str = ""
    namespace_labels: dict = field(default_factory=dict)
    pod: bool = True


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector: ``{}`` selects everything; matchLabels and matchExpressions are ANDed."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In":
            ok = present and labels[key] in values
        elif operator == "NotIn":
            ok = not present or labels[key] not in values
        elif operator == "Exists":
            ok = present
        elif operator == "DoesNotExist":
            ok = not present
        else:
            raise ValueError(f"unknown selector operator {operator!r}")
        if not ok:
            return False
    return True


def _policy_types(policy: dict) -> set[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return set(spec["policyTypes"])
    return {"Ingress"} | ({"Egress"} if spec.get("egress") else set())


def _peer_matches(peer: dict, other: Endpoint, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return not other.pod
    if not other.pod:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector"), other.labels)


def _port_matches(ports: list[dict] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        if not isinstance(entry["port"], int):
            raise ValueError(f"named port {entry['port']!r} is not modelled here")
        if entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def _allows(
    policies: list[dict], subject: Endpoint, other: Endpoint, port: int, protocol: str, direction: str
):
    """``direction`` is "Ingress" (other -> subject) or "Egress" (subject -> other)."""
    if not subject.pod:
        return True  # not a pod: no policy applies to it
    applicable = [
        p
        for p in policies
        if p["metadata"]["namespace"] == subject.namespace
        and selects(p["spec"]["podSelector"], subject.labels)
        and direction in _policy_types(p)
    ]
    if not applicable:
        return True  # not isolated in this direction
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in applicable:
        for rule in policy["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(
                _peer_matches(peer, other, policy["metadata"]["namespace"]) for peer in peers
            )
            if peer_ok and _port_matches(rule.get("ports"), port, protocol):
                return True
    return False


def connection_allowed(
    policies: list[dict], source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP"
) -> bool:
    return _allows(policies, source, destination, port, protocol, "Egress") and _allows(
        policies, destination, source, port, protocol, "Ingress"
    )
