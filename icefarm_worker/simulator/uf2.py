"""The UF2 file format (https://github.com/microsoft/uf2), enough to write firmware images and to
check them the way a bootloader does: 512-byte blocks, three magic numbers, numbered blocks."""

from __future__ import annotations

import struct

BLOCK_SIZE = 512
PAYLOAD_SIZE = 256
MAGIC_START0 = 0x0A324655
MAGIC_START1 = 0x9E5D5157
MAGIC_END = 0x0AB16F30
FLAG_FAMILY_ID = 0x00002000
RP2350_ARM_S = 0xE48BFF59
FLASH_BASE = 0x10000000
_HEADER = struct.Struct("<8I")  # magic0, magic1, flags, address, size, block, count, family
_DATA_AREA = BLOCK_SIZE - _HEADER.size - 4


class Uf2Error(ValueError):
    """The file is not a UF2 image (a bootloader ignores it)."""


def encode(payload: bytes, family: int = RP2350_ARM_S) -> bytes:
    """`payload` as a UF2 image for flash at FLASH_BASE."""
    chunks = [payload[i : i + PAYLOAD_SIZE] for i in range(0, len(payload), PAYLOAD_SIZE)]
    chunks = chunks or [b""]
    blocks = []
    for number, chunk in enumerate(chunks):
        header = _HEADER.pack(
            MAGIC_START0,
            MAGIC_START1,
            FLAG_FAMILY_ID,
            FLASH_BASE + number * PAYLOAD_SIZE,
            len(chunk),
            number,
            len(chunks),
            family,
        )
        data = chunk.ljust(_DATA_AREA, b"\0")
        blocks.append(header + data + struct.pack("<I", MAGIC_END))
    return b"".join(blocks)


def decode(image: bytes) -> bytes | None:
    """The payload of a complete image; None while blocks are still missing (a copy in
    progress); Uf2Error as soon as the bytes cannot be UF2."""
    if len(image) >= 8 and _HEADER.unpack_from(image.ljust(_HEADER.size, b"\0"))[:2] != (
        MAGIC_START0,
        MAGIC_START1,
    ):
        raise Uf2Error("does not start with the UF2 magic numbers")
    parts: dict[int, bytes] = {}
    expected: int | None = None
    for offset in range(0, len(image) - len(image) % BLOCK_SIZE, BLOCK_SIZE):
        block = image[offset : offset + BLOCK_SIZE]
        magic0, magic1, _flags, _address, size, number, count, _family = _HEADER.unpack_from(block)
        (magic_end,) = struct.unpack_from("<I", block, BLOCK_SIZE - 4)
        if (magic0, magic1, magic_end) != (MAGIC_START0, MAGIC_START1, MAGIC_END):
            raise Uf2Error(f"block at offset {offset} has bad magic numbers")
        if size > _DATA_AREA or number >= count or count != (expected or count):
            raise Uf2Error(f"block at offset {offset} is inconsistent")
        expected = count
        parts[number] = block[_HEADER.size : _HEADER.size + size]
    if expected is None or len(parts) < expected:
        return None
    return b"".join(parts[number] for number in range(expected))
