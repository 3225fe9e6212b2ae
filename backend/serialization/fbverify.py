"""A flatbuffer verifier in Python, driven by the schema's .fbs text.

flatbuffers' Python readers trust the buffer: they follow offsets and read
counts as they find them. A corrupted or hostile file then fails late, in odd
places, or -- worse -- makes the reader do work out of all proportion to its
size (a table reachable from a million vector slots is unpacked a million
times). This module does what the C++ ``flatbuffers::Verifier`` does before
anything is unpacked:

  * every table's vtable, every field, every offset, every vector and string
    (length prefix, elements, a string's NUL terminator) lies inside the buffer;
  * every scalar, offset, length prefix and vtable is aligned to its size
    (relative to the buffer's start), as the C++ verifier requires -- the
    native delegate's C++ reader uses that verifier, so both refuse the same;
  * union type tags name a member of the union;
  * nesting is at most ``max_depth`` tables deep;
  * the objects reached claim no more bytes than the buffer holds. Writers of
    these schemas (ExecuTorch's serializer, blob.py) never share or overlap
    objects, so a legal buffer's tables (4 bytes each at least) and vectors
    (4 + payload bytes) fit in it side by side; a buffer whose offsets point
    many slots at one region is refused before a reader multiplies it.

So everything a reader does afterwards is bounded by the buffer's size.
Supported: tables, enums, unions of tables, scalars, strings and vectors of
scalars, strings and tables -- all that ExecuTorch's program.fbs and our
schema.fbs use. Structs and explicit field ``id``\\ s are refused when the
schema is parsed, so a schema that starts using them fails loudly here.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

SCALAR_SIZES = {
    "bool": 1, "byte": 1, "ubyte": 1, "int8": 1, "uint8": 1,
    "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
    "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4,
    "long": 8, "ulong": 8, "int64": 8, "uint64": 8, "double": 8, "float64": 8,
}
MAX_DEPTH = 64
MAX_BUFFER_BYTES = 2**31 - 1   # FLATBUFFERS_MAX_BUFFER_SIZE: offsets are 32-bit


class FlatbufferVerifyError(ValueError):
    """The buffer breaks a rule of the flatbuffer format or of its schema."""


@dataclass(frozen=True)
class Field:
    name: str
    kind: str                 # "scalar" | "string" | "table" | "union" | "vector"
    type_name: str            # scalar/enum/table/union name; for vectors, the element type
    size: int = 0             # scalar bytes (scalar fields, scalar vector elements)
    elem_kind: str = ""       # vectors: "scalar" | "string" | "table"


@dataclass
class Schema:
    tables: Dict[str, List[Field]] = field(default_factory=dict)
    unions: Dict[str, List[str]] = field(default_factory=dict)
    enums: Dict[str, int] = field(default_factory=dict)   # enum name -> byte size of its underlying type
    root_type: str = ""
    file_identifier: bytes = b""


_COMMENT = re.compile(r"//[^\n]*")
_DECL = re.compile(r"\b(table|struct|enum|union)\s+(\w+)\s*(?::\s*(\w+))?\s*\{([^}]*)\}", re.S)


def parse_schema(*texts: str) -> Schema:
    """Schema of one or more .fbs texts (include statements are ignored: pass every file)."""
    schema = Schema()
    raw_tables: Dict[str, str] = {}
    for text in texts:
        text = _COMMENT.sub("", text)
        m = re.search(r'file_identifier\s+"(\w{4})"\s*;', text)
        if m:
            schema.file_identifier = m.group(1).encode("ascii")
        m = re.search(r"root_type\s+(\w+)\s*;", text)
        if m:
            schema.root_type = m.group(1)
        for kind, name, base, body in _DECL.findall(text):
            if kind == "struct":
                raise NotImplementedError(f"fbverify: structs are not supported (struct {name})")
            if kind == "enum":
                if base not in SCALAR_SIZES:
                    raise NotImplementedError(f"fbverify: enum {name} has underlying type {base!r}")
                schema.enums[name] = SCALAR_SIZES[base]
            elif kind == "union":
                schema.unions[name] = [m.strip().split(":")[-1].strip() for m in body.split(",") if m.strip()]
            else:
                raw_tables[name] = body
    for name, body in raw_tables.items():
        fields = []
        for decl in body.split(";"):
            decl = decl.strip()
            if not decl:
                continue
            m = re.fullmatch(r"(\w+)\s*:\s*(\[\s*\w+\s*\]|\w+)\s*(?:=\s*[\w.+-]+)?\s*(\(.*\))?", decl, re.S)
            if not m:
                raise NotImplementedError(f"fbverify: cannot parse field {decl!r} of table {name}")
            fname, ftype, attrs = m.group(1), m.group(2).replace(" ", ""), m.group(3) or ""
            if re.search(r"\bid\s*:", attrs):
                raise NotImplementedError(f"fbverify: explicit field ids are not supported ({name}.{fname})")
            if ftype.startswith("["):
                elem = ftype[1:-1]
                kind, size = _kind_of(elem, schema, raw_tables)
                if kind == "union":
                    raise NotImplementedError(f"fbverify: vectors of unions are not supported ({name}.{fname})")
                fields.append(Field(fname, "vector", elem, size, kind))
            else:
                kind, size = _kind_of(ftype, schema, raw_tables)
                if kind == "union":   # a union takes two vtable slots: its type tag, then the value
                    fields.append(Field(fname + "_type", "scalar", "ubyte", 1))
                fields.append(Field(fname, kind, ftype, size))
        schema.tables[name] = fields
    if schema.root_type not in schema.tables:
        raise NotImplementedError(f"fbverify: root type {schema.root_type!r} is not a table of the schema")
    return schema


def _kind_of(type_name: str, schema: Schema, tables: Dict[str, str]) -> Tuple[str, int]:
    if type_name in SCALAR_SIZES:
        return "scalar", SCALAR_SIZES[type_name]
    if type_name in schema.enums:
        return "scalar", schema.enums[type_name]
    if type_name == "string":
        return "string", 0
    if type_name in schema.unions:
        return "union", 0
    if type_name in tables:
        return "table", 0
    raise NotImplementedError(f"fbverify: unknown type {type_name!r}")


def _no_note(kind: str, pos: int, size: int, path: str) -> None:
    """The default note callback of _Verifier: a no-op."""


class _Verifier:
    def __init__(self, schema: Schema, buf: bytes, max_depth: int,
                 note: Optional[Callable[[str, int, int, str], None]] = None):
        self.schema = schema
        self.buf = buf
        self.size = len(buf)
        self.max_depth = max_depth
        self.claimed = 0   # bytes the objects reached so far occupy
        # verify()'s note: called for every structural field verified.
        self.note: Callable[[str, int, int, str], None] = note if note is not None else _no_note

    def fail(self, msg: str) -> None:
        raise FlatbufferVerifyError(msg)

    def need(self, pos: int, nbytes: int, what: str) -> None:
        if pos < 0 or nbytes < 0 or pos + nbytes > self.size:
            self.fail(f"{what} at offset {pos} ({nbytes} bytes) lies outside the {self.size}-byte buffer")

    def aligned(self, pos: int, nbytes: int, what: str) -> None:
        if pos % nbytes:
            self.fail(f"{what} at offset {pos} is not aligned to {nbytes} bytes")

    def claim(self, nbytes: int, what: str) -> None:
        self.claimed += nbytes
        if self.claimed > self.size:
            self.fail(
                f"{what}: the objects reached claim more than the buffer's {self.size} bytes "
                "(offsets share or overlap regions)"
            )

    def u8(self, pos: int) -> int:
        return self.buf[pos]

    def u16(self, pos: int) -> int:
        return struct.unpack_from("<H", self.buf, pos)[0]

    def u32(self, pos: int) -> int:
        return struct.unpack_from("<I", self.buf, pos)[0]

    def i32(self, pos: int) -> int:
        return struct.unpack_from("<i", self.buf, pos)[0]

    def offset_target(self, pos: int, what: str) -> int:
        self.need(pos, 4, what + " offset")
        self.aligned(pos, 4, what + " offset")
        self.note("uoffset", pos, 4, what)
        if self.u32(pos) == 0:   # the C++ verifier's rule too: an offset never points at itself
            self.fail(f"{what} offset at {pos} is 0")
        return pos + self.u32(pos)

    def table(self, pos: int, type_name: str, depth: int, path: str) -> None:
        if depth > self.max_depth:
            self.fail(f"{path}: tables nest more than {self.max_depth} deep")
        self.need(pos, 4, f"{path} ({type_name} table)")
        self.aligned(pos, 4, f"{path} ({type_name} table)")
        self.claim(4, path)
        self.note("soffset", pos, 4, path)
        vtable = pos - self.i32(pos)
        self.need(vtable, 4, f"{path} vtable")
        self.aligned(vtable, 2, f"{path} vtable")
        self.note("vtable_size", vtable, 2, path)
        self.note("table_size", vtable + 2, 2, path)
        vsize, tsize = self.u16(vtable), self.u16(vtable + 2)
        if vsize < 4 or vsize % 2:
            self.fail(f"{path}: vtable size {vsize} is not an even number >= 4")
        self.need(vtable, vsize, f"{path} vtable")
        if tsize < 4:
            self.fail(f"{path}: table size {tsize} is below 4")
        self.need(pos, tsize, f"{path} ({type_name} table body)")
        fields = self.schema.tables[type_name]
        union_tag = 0
        for slot, f in enumerate(fields):
            entry = 4 + 2 * slot
            voffset = self.u16(vtable + entry) if entry + 2 <= vsize else 0
            if f.kind == "union":
                tag, union_tag = union_tag, 0
            if voffset == 0:
                continue
            fpos = pos + voffset
            where = f"{path}.{f.name}"
            self.note("voffset", vtable + entry, 2, where)
            if f.kind == "scalar":
                self.need(fpos, f.size, where)
                self.aligned(fpos, f.size, where)
                self.note("scalar", fpos, f.size, where)
                if f.name.endswith("_type") and slot + 1 < len(fields) and fields[slot + 1].kind == "union":
                    union_tag = self.u8(fpos)
            elif f.kind == "string":
                self.string(self.offset_target(fpos, where), where)
            elif f.kind == "table":
                self.table(self.offset_target(fpos, where), f.type_name, depth + 1, where)
            elif f.kind == "union":
                members = self.schema.unions[f.type_name]
                if tag == 0:
                    continue
                if tag > len(members):
                    self.fail(f"{where}: union type tag {tag} names no member of {f.type_name} ({len(members)} members)")
                self.table(self.offset_target(fpos, where), members[tag - 1], depth + 1, where)
            else:
                self.vector(self.offset_target(fpos, where), f, depth, where)

    def string(self, pos: int, path: str) -> None:
        self.need(pos, 4, f"{path} (string length)")
        self.aligned(pos, 4, f"{path} (string length)")
        self.note("length", pos, 4, path)
        length = self.u32(pos)
        self.need(pos + 4, length + 1, f"{path} (string of {length} bytes)")
        if self.buf[pos + 4 + length] != 0:
            self.fail(f"{path}: string of {length} bytes is not NUL-terminated")
        self.claim(4 + length + 1, path)

    def vector(self, pos: int, f: Field, depth: int, path: str) -> None:
        self.need(pos, 4, f"{path} (vector length)")
        self.aligned(pos, 4, f"{path} (vector length)")
        self.note("length", pos, 4, path)
        count = self.u32(pos)
        elem_bytes = f.size if f.elem_kind == "scalar" else 4
        self.need(pos + 4, count * elem_bytes, f"{path} (vector of {count} elements)")
        self.claim(4 + count * elem_bytes, path)
        if f.elem_kind == "scalar":
            return
        for i in range(count):
            slot = pos + 4 + 4 * i
            self.note("uoffset", slot, 4, f"{path}[{i}]")
            target = slot + self.u32(slot)
            if f.elem_kind == "string":
                self.string(target, f"{path}[{i}]")
            else:
                self.table(target, f.type_name, depth + 1, f"{path}[{i}]")


def verify(schema: Schema, buf: bytes, max_depth: int = MAX_DEPTH, check_identifier: bool = True,
           note: Optional[Callable[[str, int, int, str], None]] = None) -> None:
    """Raise FlatbufferVerifyError unless buf is a well-formed buffer of the schema's root type.

    note(kind, offset, size, path), when given, is called for every structural
    field on the way: "soffset" (a table's vtable offset), "vtable_size",
    "table_size", "voffset" (a vtable entry), "scalar", "uoffset", "length"
    (of a vector or string). The fuzz tests use it to aim mutations.
    """
    buf = bytes(buf)
    if len(buf) > MAX_BUFFER_BYTES:
        raise FlatbufferVerifyError(f"a flatbuffer holds at most {MAX_BUFFER_BYTES} bytes, this one {len(buf)}")
    if len(buf) < 8:
        raise FlatbufferVerifyError(f"a flatbuffer with an identifier has at least 8 bytes, this one {len(buf)}")
    if check_identifier and schema.file_identifier and buf[4:8] != schema.file_identifier:
        raise FlatbufferVerifyError(f"file identifier {buf[4:8]!r}, expected {schema.file_identifier!r}")
    v = _Verifier(schema, buf, max_depth, note)
    v.claim(8, "header")
    v.note("uoffset", 0, 4, "root")
    v.table(v.u32(0), schema.root_type, 0, schema.root_type)


def schema_from_package(package: str, *names: str) -> Schema:
    """Parse .fbs files shipped as package data (importlib.resources)."""
    import importlib.resources

    root = importlib.resources.files(package)
    return parse_schema(*(root.joinpath(n).read_text(encoding="utf-8") for n in names))
