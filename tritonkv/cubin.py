"""Facts a compiled kernel's CUDA ELF (cubin) records, read without a GPU: how many registers
each thread of a kernel uses, from which its occupancy follows (kernels.common.blocks_per_sm).
ptxas writes them as EIATTR_REGCOUNT entries of the ``.nv.info`` section, keyed by the
kernel's symbol; ``python -m tritonkv.aot`` reports them per kernel."""

from __future__ import annotations

import struct
from typing import Dict, Iterator, Tuple

EIATTR_REGCOUNT = 0x2F
EIFMT_SVAL = 0x04       # an attribute followed by a 16-bit size and that many bytes
_SECTION = "<IIQQQQIIQQ"   # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, align, entsize
_SYMBOL_SIZE = 24          # Elf64_Sym


def _sections(cubin: bytes) -> Iterator[Tuple[str, int, int]]:
    """(name, file offset, size) of each section of a 64-bit little-endian ELF."""
    if cubin[:5] != b"\x7fELF\x02":
        raise ValueError("cubin: expected a 64-bit ELF")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    header = lambda i: struct.unpack_from(_SECTION, cubin, shoff + i * shentsize)  # noqa: E731
    names = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        yield _string(cubin, names + h[0]), h[4], h[5]


def _string(data: bytes, start: int) -> str:
    return data[start:data.index(b"\0", start)].decode()


def registers(cubin: bytes) -> Dict[str, int]:
    """{kernel name: registers per thread} of the kernels in ``cubin``."""
    sections = {name: (offset, size) for name, offset, size in _sections(cubin)}
    if ".nv.info" not in sections:
        return {}
    symtab, strtab = sections[".symtab"], sections[".strtab"]
    symbols = {i: _string(cubin, strtab[0] + struct.unpack_from("<I", cubin, symtab[0] + _SYMBOL_SIZE * i)[0])
               for i in range(symtab[1] // _SYMBOL_SIZE)}
    out = {}
    pos, end = sections[".nv.info"][0], sum(sections[".nv.info"])
    while pos + 4 <= end:
        fmt, attr, size = struct.unpack_from("<BBH", cubin, pos)
        if fmt != EIFMT_SVAL:   # the other formats hold their value in place of the size
            pos += 4
            continue
        if attr == EIATTR_REGCOUNT:
            symbol, count = struct.unpack_from("<II", cubin, pos + 4)
            out[symbols.get(symbol, str(symbol))] = count
        pos += 4 + size
    return out
