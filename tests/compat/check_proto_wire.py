#!/usr/bin/env python3
"""Wire-compatibility check: our Axon Server protos versus descriptors we did not write.

The PyPI package `axonclient` ships `_pb2.py` modules generated from AxonIQ's own `.proto` files
(a subset of the API, of an older upstream version). This script compiles OUR files under
`proto/protos/axon/` with the protoc bundled in `grpcio-tools`, loads axonclient's descriptors, and
compares, for the five client-API packages, every message, enum and service axonclient knows:

  * fields: name, number, type, label, type_name, oneof membership, proto3 `optional`, map-ness;
  * reserved numbers: a number axonclient reserves must not be in use in ours;
  * enums: value names and numbers;
  * services: method names, request/response types, client/server streaming.

What counts as a difference (exit 1): anything axonclient has that ours lacks or declares otherwise.
What is only reported as information:
  * types, fields and enum values ours has but axonclient does not (newer upstream, or left out of
    axonclient's trimmed copy);
  * a field axonclient still has whose number ours (like newest upstream) marks `reserved`: the number
    is retired, so a peer that still sends it is read as an unknown field, as upstream does;
  * an RPC whose request/response type name differs from axonclient's while ours is a field-by-field
    superset of theirs (identical bytes for every field they know), e.g. AppendEvent answering
    ConfirmationWithConsistencyMarker where older protos say Confirmation.

Run with the venv that has `axonclient==0.2` and `grpcio-tools` installed:

    target/pyenv-protocheck/bin/python tests/compat/check_proto_wire.py

or under pytest (`test_proto_wire_compatible`).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto" / "protos"
OUR_FILES = [
    "axon/common.proto",
    "axon/event.proto",
    "axon/control.proto",
    "axon/command.proto",
    "axon/query.proto",
]
PACKAGES = {
    "io.axoniq.axonserver.grpc",
    "io.axoniq.axonserver.grpc.event",
    "io.axoniq.axonserver.grpc.control",
    "io.axoniq.axonserver.grpc.command",
    "io.axoniq.axonserver.grpc.query",
}


@dataclass
class Report:
    differences: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    messages: int = 0
    enums: int = 0
    services: int = 0

    def diff(self, text: str) -> None:
        self.differences.append(text)

    def note(self, text: str) -> None:
        self.info.append(text)

    def summary(self) -> str:
        return (
            f"proto wire check: {self.messages} messages, {self.enums} enums, "
            f"{self.services} services compared, {len(self.differences)} differences"
        )


@dataclass
class Catalog:
    """Every message, enum and service of the five packages, by fully qualified name (leading dot)."""

    messages: dict = field(default_factory=dict)
    enums: dict = field(default_factory=dict)
    services: dict = field(default_factory=dict)


def _catalog(files) -> Catalog:
    cat = Catalog()

    def add_message(prefix: str, msg) -> None:
        name = f"{prefix}.{msg.name}"
        cat.messages[name] = msg
        for nested in msg.nested_type:
            add_message(name, nested)
        for enum in msg.enum_type:
            cat.enums[f"{name}.{enum.name}"] = enum

    for fd in files:
        if fd.package not in PACKAGES:
            continue
        prefix = f".{fd.package}"
        for msg in fd.message_type:
            add_message(prefix, msg)
        for enum in fd.enum_type:
            cat.enums[f"{prefix}.{enum.name}"] = enum
        for svc in fd.service:
            cat.services[f"{prefix}.{svc.name}"] = svc
    return cat


def _compile_ours():
    """Compiles our five files (plus imports) into FileDescriptorProtos with grpc_tools' protoc."""
    from google.protobuf import descriptor_pb2
    import grpc_tools

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="protocheck-") as tmp:
        out = Path(tmp) / "ours.pb"
        cmd = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "--include_imports",
            f"--descriptor_set_out={out}",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            *OUR_FILES,
        ]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                "protoc failed on our .proto files:\n" + proc.stdout + proc.stderr
            )
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return list(fds.file)


def _load_axonclient():
    """FileDescriptorProtos embedded in axonclient's generated `_pb2` modules."""
    from google.protobuf import descriptor_pb2
    import axonclient.protos as protos

    files = []
    for mod in pkgutil.iter_modules(protos.__path__):
        if not mod.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"axonclient.protos.{mod.name}")
        files.append(descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb))
    if not files:
        raise RuntimeError("no *_pb2 modules found in axonclient.protos")
    return files


def _type_label(value: int, enum_cls) -> str:
    return enum_cls.Name(value)


def _reserved(ranges, number: int) -> bool:
    # Message reserved ranges are end-exclusive, enum reserved ranges end-inclusive; callers pass
    # ranges already normalised to (start, end_exclusive).
    return any(start <= number < end for start, end in ranges)


def _msg_reserved(msg):
    return [(r.start, r.end) for r in msg.reserved_range]


def _enum_reserved(enum):
    return [(r.start, r.end + 1) for r in enum.reserved_range]


def _field_signature(fld, owner):
    """Everything about a field that has to agree, as comparable tuples."""
    oneof = None
    if fld.HasField("oneof_index") and not fld.proto3_optional:
        oneof = owner.oneof_decl[fld.oneof_index].name
    return {
        "name": fld.name,
        "type": fld.type,
        "label": fld.label,
        "type_name": fld.type_name,
        "oneof": oneof,
        "proto3_optional": fld.proto3_optional,
    }


def _describe(key: str, value) -> str:
    from google.protobuf import descriptor_pb2

    fdp = descriptor_pb2.FieldDescriptorProto
    if key == "type":
        return _type_label(value, fdp.Type)
    if key == "label":
        return _type_label(value, fdp.Label)
    return repr(value)


def _compare_message(name, theirs, ours, cat_theirs, cat_ours, report: Report) -> None:
    if theirs.options.map_entry != ours.options.map_entry:
        report.diff(f"{name}: map entry {theirs.options.map_entry} in axonclient, {ours.options.map_entry} in ours")
    ours_by_number = {f.number: f for f in ours.field}
    theirs_numbers = {f.number for f in theirs.field}
    our_reserved = _msg_reserved(ours)

    for tf in theirs.field:
        where = f"{name}.{tf.name} (#{tf.number})"
        of = ours_by_number.get(tf.number)
        if of is None:
            if _reserved(our_reserved, tf.number) or tf.name in ours.reserved_name:
                report.note(f"{where}: retired upstream, reserved in ours (peers sending it are read as unknown field)")
            else:
                report.diff(f"{where}: missing in ours")
            continue
        ts, os_ = _field_signature(tf, theirs), _field_signature(of, ours)
        for key in ts:
            if ts[key] != os_[key]:
                report.diff(f"{where}: {key} is {_describe(key, ts[key])} in axonclient, {_describe(key, os_[key])} in ours")

    for of in ours.field:
        if of.number not in theirs_numbers:
            report.note(f"{name}.{of.name} (#{of.number}): only in ours")

    # Numbers axonclient reserves must not be in use in ours.
    for start, end in _msg_reserved(theirs):
        for number in range(start, end):
            if number in ours_by_number and not _reserved(our_reserved, number):
                report.diff(f"{name}: #{number} reserved in axonclient but used by {ours_by_number[number].name} in ours")
        if not all(_reserved(our_reserved, n) for n in range(start, end)):
            report.note(f"{name}: reserved {start}..{end - 1} of axonclient not all reserved in ours")


def _compare_enum(name, theirs, ours, report: Report) -> None:
    ours_by_number = {v.number: v for v in ours.value}
    theirs_numbers = {v.number for v in theirs.value}
    our_reserved = _enum_reserved(ours)
    for tv in theirs.value:
        ov = ours_by_number.get(tv.number)
        if ov is None:
            if _reserved(our_reserved, tv.number):
                report.note(f"{name}.{tv.name} (={tv.number}): retired upstream, reserved in ours")
            else:
                report.diff(f"{name}.{tv.name} (={tv.number}): missing in ours")
        elif ov.name != tv.name:
            report.diff(f"{name} ={tv.number}: named {tv.name} in axonclient, {ov.name} in ours")
    for ov in ours.value:
        if ov.number not in theirs_numbers:
            report.note(f"{name}.{ov.name} (={ov.number}): only in ours")
    for start, end in _enum_reserved(theirs):
        for number in range(start, end):
            if number in ours_by_number:
                report.diff(f"{name}: ={number} reserved in axonclient but used by {ours_by_number[number].name} in ours")


def _wire_superset(their_type: str, our_type: str, cat_theirs: Catalog, cat_ours: Catalog) -> bool:
    """True when every field of axonclient's message exists identically in ours (name, number, type,
    label, type_name), so bytes either side writes for those fields read the same on the other."""
    theirs, ours = cat_theirs.messages.get(their_type), cat_ours.messages.get(our_type)
    if theirs is None or ours is None:
        return False
    ours_by_number = {f.number: f for f in ours.field}
    for tf in theirs.field:
        of = ours_by_number.get(tf.number)
        if of is None:
            return False
        if (tf.name, tf.type, tf.label, tf.type_name) != (of.name, of.type, of.label, of.type_name):
            return False
    return True


def _compare_service(name, theirs, ours, cat_theirs, cat_ours, report: Report) -> None:
    ours_by_name = {m.name: m for m in ours.method}
    theirs_names = {m.name for m in theirs.method}
    for tm in theirs.method:
        where = f"{name}/{tm.name}"
        om = ours_by_name.get(tm.name)
        if om is None:
            report.diff(f"{where}: missing in ours")
            continue
        for attr in ("client_streaming", "server_streaming"):
            if getattr(tm, attr) != getattr(om, attr):
                report.diff(f"{where}: {attr} is {getattr(tm, attr)} in axonclient, {getattr(om, attr)} in ours")
        for attr in ("input_type", "output_type"):
            t, o = getattr(tm, attr), getattr(om, attr)
            if t == o:
                continue
            if _wire_superset(t, o, cat_theirs, cat_ours):
                report.note(f"{where}: {attr} {t} in axonclient, {o} in ours (a wire-compatible superset)")
            else:
                report.diff(f"{where}: {attr} is {t} in axonclient, {o} in ours")
    for om in ours.method:
        if om.name not in theirs_names:
            report.note(f"{name}/{om.name}: only in ours")


def run_check() -> Report:
    report = Report()
    cat_ours = _catalog(_compile_ours())
    cat_theirs = _catalog(_load_axonclient())

    for name, theirs in sorted(cat_theirs.messages.items()):
        ours = cat_ours.messages.get(name)
        if ours is None:
            report.diff(f"message {name}: missing in ours")
            continue
        report.messages += 1
        _compare_message(name, theirs, ours, cat_theirs, cat_ours, report)
    for name, theirs in sorted(cat_theirs.enums.items()):
        ours = cat_ours.enums.get(name)
        if ours is None:
            report.diff(f"enum {name}: missing in ours")
            continue
        report.enums += 1
        _compare_enum(name, theirs, ours, report)
    for name, theirs in sorted(cat_theirs.services.items()):
        ours = cat_ours.services.get(name)
        if ours is None:
            report.diff(f"service {name}: missing in ours")
            continue
        report.services += 1
        _compare_service(name, theirs, ours, cat_theirs, cat_ours, report)

    for kind, ours_map, theirs_map in (
        ("message", cat_ours.messages, cat_theirs.messages),
        ("enum", cat_ours.enums, cat_theirs.enums),
        ("service", cat_ours.services, cat_theirs.services),
    ):
        for name in sorted(set(ours_map) - set(theirs_map)):
            if kind == "message" and ours_map[name].options.map_entry:
                continue
            report.note(f"{kind} {name}: only in ours (not in axonclient)")
    return report


def main() -> int:
    try:
        report = run_check()
    except ModuleNotFoundError as exc:
        print(f"proto wire check: cannot run, {exc}; install with `pip install axonclient==0.2 grpcio-tools`",
              file=sys.stderr)
        return 2
    verbose = os.environ.get("PROTOCHECK_QUIET") is None
    if verbose:
        for line in report.info:
            print(f"info: {line}")
    for line in report.differences:
        print(f"DIFFERENCE: {line}")
    print(report.summary())
    return 1 if report.differences else 0


def test_proto_wire_compatible():
    report = run_check()
    assert not report.differences, "\n".join(report.differences + [report.summary()])


if __name__ == "__main__":
    sys.exit(main())
