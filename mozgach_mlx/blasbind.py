"""Point MLX's CPU GEMM at an optimized OpenBLAS after ``mlx.core`` is loaded.

The ``mlx[cpu]`` wheel links a reference BLAS (~3 GFLOP/s fp32 GEMM on the 2-core dev
machine). ``libmlx.so`` reaches ``cblas_sgemm`` / ``cblas_dgemm`` / ``cblas_cgemm``
through its global offset table (GOT): one pointer per imported function, filled by the
dynamic linker. :func:`bind` rewrites those pointers, in this process only, to the same
functions of another library, so the import order of ``mlx.core`` and ``mozgach_mlx``
does not matter and the library may export prefixed names: the pip wheel
``scipy-openblas32`` ships ``libscipy_openblas.so`` with ``scipy_cblas_sgemm`` and no
``libgfortran`` need.

How (Linux ELF64, x86_64 and aarch64):

1. find the loaded ``libmlx.so`` and its load bias (``dl_iterate_phdr``);
2. parse its file: the dynamic symbol table and the relocations (``DT_RELA``,
   ``DT_JMPREL``) whose symbol is one of :data:`GEMMS`; only ``JUMP_SLOT`` /
   ``GLOB_DAT`` relocations (a plain pointer slot) are accepted, anything else aborts;
3. write the new function's address into each slot (``mprotect`` it writable first if
   its page is read-only, e.g. under ``BIND_NOW`` + RELRO, and restore the protection);
   Before any write, each slot must lie in libmlx.so's own mapping and hold a pointer
   into executable memory (the function the dynamic linker bound, or the PLT stub), so
   a file that differs from the loaded one cannot make us overwrite anything else;
4. self-check: matmuls of every dtype (odd shapes, transposed operands, ``addmm`` with
   alpha/beta) must equal a BLAS-free numpy product; on a mismatch every slot is
   restored to its old value.

Only the three GEMMs are rebound; MLX's LAPACK imports (``sgetrf_`` ...) keep the
wheel's reference LAPACK, which is correct and off every training path. An
ILP64 OpenBLAS (64-bit integers, e.g. numpy's ``scipy_openblas64_``) is refused: MLX
passes 32-bit ``int`` arguments.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GEMMS = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")
PREFIXES = ("", "scipy_")  # plain OpenBLAS, then the scipy-openblas32 wheel's names

_EM_X86_64, _EM_AARCH64 = 62, 183
# (GLOB_DAT, JUMP_SLOT) relocation types per machine: both are "store S here".
_POINTER_RELOCS = {_EM_X86_64: (6, 7), _EM_AARCH64: (1025, 1026)}
_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_STRTAB, _DT_SYMTAB, _DT_RELA, _DT_RELASZ = 0, 5, 6, 7, 8
_DT_PLTRELSZ, _DT_JMPREL, _DT_PLTREL = 2, 23, 20
_PROT = {"r": 1, "w": 2, "x": 4}


class BindError(Exception):
    """Why the GEMM slots could not be bound (the bundled BLAS stays in use)."""


@dataclass(frozen=True)
class Binding:
    """What :func:`bind` did: the library, and each slot (absolute address) per symbol."""

    library: str
    slots: dict[str, tuple[int, ...]]
    targets: dict[str, int]
    prefix: str = ""


# ---------------------------------------------------------------------------- ELF file


def _load_segments(data: bytes, phoff: int, phnum: int, phentsize: int) -> tuple[list, int | None]:
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, _memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = p_offset
    return loads, dynamic


def _vaddr_to_offset(loads: list, vaddr: int) -> int:
    for p_vaddr, p_offset, p_filesz in loads:
        if p_vaddr <= vaddr < p_vaddr + p_filesz:
            return vaddr - p_vaddr + p_offset
    raise BindError(f"address {vaddr:#x} is in no loaded segment of the file")


def _dynamic_entries(data: bytes, offset: int) -> dict[int, int]:
    entries: dict[int, int] = {}
    while offset + 16 <= len(data):
        tag, val = struct.unpack_from("<qQ", data, offset)
        if tag == _DT_NULL:
            return entries
        entries.setdefault(tag, val)
        offset += 16
    raise BindError("unterminated dynamic section")


def _cstr(data: bytes, offset: int) -> str:
    end = data.find(b"\0", offset)
    return data[offset:end].decode("ascii", "replace")


def gemm_slots(path: str | os.PathLike, names: tuple[str, ...] = GEMMS) -> dict[str, list[int]]:
    """The GOT slots (virtual addresses relative to the load bias) of ``names`` in ``path``.

    Parses the ELF64 little-endian file's dynamic section and both relocation tables.
    Names the file does not import are left out, but the first one (``cblas_sgemm``, the
    one that matters) must be there. Raises :class:`BindError` for anything unexpected:
    another format or machine, no relocation for ``names[0]``, or a relocation of a type
    other than a plain pointer store.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise BindError(f"{path} is not a little-endian ELF64 file")
        machine, = struct.unpack_from("<H", data, 18)
        if machine not in _POINTER_RELOCS:
            raise BindError(f"{path}: machine {machine} is not x86_64 or aarch64")
        phoff, = struct.unpack_from("<Q", data, 32)
        phentsize, phnum = struct.unpack_from("<HH", data, 54)
        loads, dyn_off = _load_segments(data, phoff, phnum, phentsize)
        if dyn_off is None:
            raise BindError(f"{path} has no dynamic section")
        dyn = _dynamic_entries(data, dyn_off)
        if _DT_SYMTAB not in dyn or _DT_STRTAB not in dyn:
            raise BindError(f"{path}: no dynamic symbol table")
        if dyn.get(_DT_PLTREL, _DT_RELA) != _DT_RELA:
            raise BindError(f"{path}: PLT relocations are not RELA")
        symtab = _vaddr_to_offset(loads, dyn[_DT_SYMTAB])
        strtab = _vaddr_to_offset(loads, dyn[_DT_STRTAB])
        tables = [(dyn[a], dyn[n]) for a, n in ((_DT_RELA, _DT_RELASZ), (_DT_JMPREL, _DT_PLTRELSZ))
                  if a in dyn and n in dyn]
        found = _scan_relocations(data, loads, tables, symtab, strtab, set(names), _POINTER_RELOCS[machine])
    if not found.get(names[0]):
        raise BindError(f"{path} imports no {names[0]}")
    return found


def _scan_relocations(data, loads, tables, symtab, strtab, names, ok_types) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for vaddr, size in tables:
        base = _vaddr_to_offset(loads, vaddr)
        for off in range(base, base + size, 24):
            r_offset, r_info, r_addend = struct.unpack_from("<QQq", data, off)
            sym, rtype = r_info >> 32, r_info & 0xFFFFFFFF
            if sym == 0:
                continue
            st_name, = struct.unpack_from("<I", data, symtab + 24 * sym)
            name = _cstr(data, strtab + st_name)
            if name not in names:
                continue
            if rtype not in ok_types or r_addend != 0:
                raise BindError(f"{name}: relocation type {rtype} (addend {r_addend}) is not a pointer slot")
            found.setdefault(name, []).append(r_offset)
    return found


# ----------------------------------------------------------------------- the process


class _PhdrInfo(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_size_t), ("name", ctypes.c_char_p),
                ("phdr", ctypes.c_void_p), ("phnum", ctypes.c_uint16)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_PhdrInfo), ctypes.c_size_t, ctypes.c_void_p)


def loaded_objects() -> list[tuple[str, int]]:
    """(path, load bias) of every shared object mapped into this process."""
    libc = ctypes.CDLL(None)
    out: list[tuple[str, int]] = []

    def visit(info, _size, _data):
        out.append(((info.contents.name or b"").decode(errors="replace"), info.contents.addr))
        return 0

    libc.dl_iterate_phdr(_CALLBACK(visit), None)
    return out


def loaded_libmlx() -> tuple[str, int]:
    """(path, load bias) of the ``libmlx.so`` in this process (``mlx.core`` must be imported)."""
    hits = [(p, b) for p, b in loaded_objects() if Path(p).name.split(".so")[0] == "libmlx" and ".so" in p]
    if len(hits) != 1:
        raise BindError(f"expected one loaded libmlx.so, found {len(hits)}")
    return hits[0]


def mappings() -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, path) of every mapping in ``/proc/self/maps``."""
    rows = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            rows.append((start, end, parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return rows


def read_slot(address: int) -> int:
    """The pointer stored at ``address``."""
    return ctypes.c_uint64.from_address(address).value


def write_slot(address: int, value: int, maps: list | None = None) -> None:
    """Store the pointer ``value`` at ``address``; a read-only page is made writable for
    the store and given its old protection back (``maps``: :func:`mappings`, if known)."""
    maps = mappings() if maps is None else maps
    row = next((m for m in maps if m[0] <= address < m[1]), None)
    if row is None:
        raise BindError(f"slot {address:#x} is not mapped")
    if "w" in row[2]:
        ctypes.c_uint64.from_address(address).value = value
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    start = address & ~(page - 1)
    old = sum(_PROT[c] for c in row[2][:3] if c in _PROT)
    if libc.mprotect(start, page, old | _PROT["w"]) != 0:
        raise BindError(f"mprotect of the GOT page failed (errno {ctypes.get_errno()})")
    try:
        ctypes.c_uint64.from_address(address).value = value
    finally:
        libc.mprotect(start, page, old)


# ------------------------------------------------------------------------ the binding


def open_library(path: str) -> tuple[ctypes.CDLL, dict[str, int], str]:
    """Load ``path`` and find :data:`GEMMS` in it, plain or ``scipy_``-prefixed.

    Returns (the library, symbol -> function address, prefix). Refuses an ILP64 build.
    """
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise BindError(f"could not load {path}: {e}") from None
    for prefix in PREFIXES:
        try:
            targets = {n: ctypes.cast(getattr(lib, prefix + n), ctypes.c_void_p).value for n in GEMMS}
        except AttributeError:
            continue
        config = getattr(lib, prefix + "openblas_get_config", None)
        if config is not None:
            config.restype = ctypes.c_char_p
            if b"USE64BITINT" in (config() or b""):
                raise BindError(f"{path} is an ILP64 (64-bit integer) build; MLX passes 32-bit ints")
        return lib, targets, prefix
    raise BindError(f"{path} exports no {GEMMS[0]} (plain or scipy_-prefixed)")


def bind(library_path: str, check=None, threads: int | None = None) -> Binding:
    """Rebind libmlx.so's GEMM slots to ``library_path``'s, self-check, restore on failure.

    ``check`` is a callable run after the slots are written (the numeric self-check,
    :func:`self_check` by default); if it raises, the old slot values are written back and
    :class:`BindError` is raised with its message. ``threads``: the library's thread
    count, set before the self-check (None keeps the library's own default).
    """
    lib, targets, prefix = open_library(library_path)
    _KEEP.setdefault(library_path, lib)
    if threads is not None:
        set_threads(Binding(library_path, {}, targets, prefix), threads)
    mlx_path, bias = loaded_libmlx()
    rel = gemm_slots(mlx_path)
    slots = {n: tuple(bias + r for r in offs) for n, offs in rel.items()}
    maps = mappings()
    old = _current_slots([a for addrs in slots.values() for a in addrs], mlx_path, maps)
    try:
        for name, addrs in slots.items():
            for a in addrs:
                write_slot(a, targets[name], maps)
        (check or self_check)()
    except Exception as e:  # restore on any failure, then report it as one BindError
        for a, v in old.items():
            write_slot(a, v, maps)
        raise BindError(f"self-check after binding {library_path} failed, bundled BLAS restored: {e}") from e
    _KEEP[library_path] = lib  # the library must stay loaded while MLX calls into it (ctypes never unloads)
    return Binding(library_path, slots, targets, prefix)


_KEEP: dict[str, ctypes.CDLL] = {}


def _current_slots(slots: list[int], mlx_path: str, maps: list) -> dict[int, int]:
    """slot -> the pointer it holds, once each slot is known to lie in libmlx.so's mapping."""
    real = os.path.realpath(mlx_path)
    old = {}
    for slot in slots:
        home = next((m for m in maps if m[0] <= slot < m[1]), None)
        if home is None or os.path.realpath(home[3] or "/") != real:
            raise BindError(f"computed GOT slot {slot:#x} is not inside {mlx_path}; not binding")
        old[slot] = value = read_slot(slot)
        target = next((m for m in maps if m[0] <= value < m[1]), None)
        if target is None or "x" not in target[2]:
            raise BindError(f"GOT slot {slot:#x} holds {value:#x}, not a code address; not binding")
    return old


def set_threads(binding: Binding, n: int | None = None) -> int | None:
    """Set (if ``n``) and return the bound OpenBLAS's thread count; None if it has no such call.

    Why it matters: on the shared, oversubscribed 2-core dev machine 2-thread OpenBLAS
    GEMMs (pip and Debian builds alike) were erratic, from 2x faster to 700x slower than
    1 thread from run to run (the caller waits for a worker thread the loaded scheduler
    does not run), and the default 108-adapter run with 2 threads cost ~50 CPU-s per
    adapter instead of ~3.6; see benchmarks/RESULTS.md.
    """
    lib = _KEEP.get(binding.library) or ctypes.CDLL(binding.library)
    getter = getattr(lib, binding.prefix + "openblas_get_num_threads", None)
    setter = getattr(lib, binding.prefix + "openblas_set_num_threads", None)
    if getter is None or setter is None:
        return None
    if n is not None:
        setter.argtypes = (ctypes.c_int,)
        setter(n)
    return int(getter())


def self_check() -> None:
    """Matmuls of float32/float64/complex64 through MLX equal a BLAS-free numpy product.

    Shapes cover 1x1, odd sizes, both operands transposed (MLX passes the transpose flags
    to the GEMM instead of copying) and ``addmm``'s alpha/beta. All products are evaluated
    in one ``mx.eval``. Raises AssertionError.
    """
    import mlx.core as mx

    rng = np.random.default_rng(1234)
    cases, got = [], []
    for mdt, ndt, tol in ((mx.float32, np.float32, 1e-4), (mx.float64, np.float64, 1e-10),
                          (mx.complex64, np.complex64, 1e-4)):
        for m, k, n in ((1, 1, 1), (3, 17, 5), (33, 65, 130)):
            a, b, c = (_rand(rng, s, ndt) for s in ((m, k), (k, n), (m, n)))
            ma, mb, mc = (mx.array(x, dtype=mdt) for x in (a, b, c))  # mx.array(float64) is float32
            at, bt = (mx.array(np.ascontiguousarray(x.T), dtype=mdt).T for x in (a, b))
            with mx.stream(mx.cpu):
                got += [ma @ mb, at @ bt, mx.addmm(mc, ma, mb, alpha=0.5, beta=2.0)]
            # broadcast-multiply-sum in complex128: no BLAS (numpy's own is an OpenBLAS too)
            ref = (a.astype(np.complex128)[:, :, None] * b.astype(np.complex128)[None, :, :]).sum(axis=1)
            cases += [(mdt, tol, f"{m}x{k}x{n}", w) for w in (ref, ref, 0.5 * ref + 2.0 * c.astype(np.complex128))]
    mx.eval(got)
    for g, (mdt, tol, shape, w) in zip(got, cases, strict=True):
        assert g.dtype == mdt, f"{mdt} {shape}: MLX returned {g.dtype}"
        err = np.abs(np.array(g) - w).max() / (np.abs(w).max() + 1e-30)
        assert err < tol, f"{mdt} {shape}: relative error {err:.2e}"


def _rand(rng, shape, dtype):
    x = rng.standard_normal(shape)
    if np.issubdtype(dtype, np.complexfloating):
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)

