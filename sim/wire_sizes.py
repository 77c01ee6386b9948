"""Payload bytes of the protocol's messages as a sending `MqttClient` counts them, from one real
encoding per kind and shape (zeros), chunked as the client chunks: the unit sim/comm_model.py
builds a device's round from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sfprompt.protocol.chunking import CHUNK_OVERHEAD, payload_limit
from sfprompt.protocol.client_config import ClientConfig
from sfprompt.protocol.codec import encode
from sfprompt.protocol.messages import BodyOut, Chunk, GradH, GradZ, Message, Smashed

ActivationKind = type[Smashed] | type[BodyOut] | type[GradZ] | type[GradH]

DEFAULT_CHUNK_BYTES = ClientConfig(client_id="comm-model").max_chunk_bytes
"""The clients' own packet limit (8 MiB); a broker may announce a smaller one."""


_REF_DEVICE = "ref"  # the envelope of the reference messages each template is encoded from


@dataclass(frozen=True)
class Link:
    """How payloads are cut into packets: the client's limit, or the broker's Maximum Packet
    Size (learnt from CONNACK) less the client's reserve for headers, whichever is smaller."""

    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    broker_max_packet: int | None = None

    @property
    def limit(self) -> int:
        """The largest payload sent whole (`MqttClient.packets`)."""
        return payload_limit(self.max_chunk_bytes, self.broker_max_packet)


@dataclass(frozen=True)
class Stamp:
    """The envelope fields whose text varies between messages of one kind and shape."""

    device_id: str
    round: int = 1
    step: int = 0

    @property
    def text(self) -> int:
        return len(self.device_id) + len(str(self.round)) + len(str(self.step))


@dataclass(frozen=True)
class _Template:
    """An encoded message's size as a function of its envelope's text length.

    Two messages of one kind and tensor shapes differ on the wire only in the envelope's text:
    msg_ids are always 32 hex digits and the tensor header is fixed by the shapes. The JSON header
    is padded to a multiple of 8 bytes (with the 8-byte length in front), as `wire.pack` does, so
    the size is rebuilt from the unpadded header of one real encoding.
    """

    header: int  # unpadded JSON header of the reference message
    data: int  # tensor bytes
    text: int  # Stamp.text of the reference message

    @classmethod
    def of(cls, payload: bytes, text: int) -> _Template:
        length = int.from_bytes(payload[:8], "little")
        header = len(payload[8 : 8 + length].rstrip(b" "))  # JSON ends in "}", never a space
        return cls(header, len(payload) - 8 - length, text)

    def size(self, text: int) -> int:
        header = self.header + text - self.text
        return 8 + header + (-(header + 8) % 8) + self.data


class WireSizes:
    """Payload bytes of the protocol's messages as a sending `MqttClient` counts them.

    Each kind and shape is encoded once, with zeros (cached), so that a paper-scale round of
    hundreds of 80 MB messages costs a few encodings.
    """

    def __init__(self, link: Link | None = None) -> None:
        self.link = link or Link()
        self._activations: dict[tuple[str, tuple[int, ...], str], _Template] = {}
        self._chunks: dict[tuple[bool, int, int, int], _Template] = {}

    def activation(
        self, cls: ActivationKind, shape: tuple[int, ...], encoding: str, stamp: Stamp
    ) -> int:
        """One SMASHED, BODY_OUT, GRAD_Z or GRAD_H of `shape` (batch first) in `encoding`."""
        key = (cls.kind, tuple(shape), encoding)
        template = self._activations.get(key)
        if template is None:
            zeros = np.zeros(shape, np.float32)
            reference = cls(  # type: ignore[call-arg]
                device_id=_REF_DEVICE, encoding=encoding, **{cls.tensor_field: zeros}
            )
            template = _Template.of(encode(reference), Stamp(_REF_DEVICE, 0, 0).text)
            self._activations[key] = template
        return self.packets(template.size(stamp.text), stamp)

    def message(self, message: Message) -> int:
        """Any message, encoded as it is (TASK, UPDATE: small, and their text varies)."""
        stamp = Stamp(message.device_id, message.round, message.step)
        return self.packets(len(encode(message)), stamp)

    def packets(self, total: int, stamp: Stamp) -> int:
        """A `total`-byte payload as sent: itself, or its chunk messages (`chunking.split`)."""
        limit = self.link.limit
        if total <= limit:
            return total
        size = max(limit, CHUNK_OVERHEAD + 1) - CHUNK_OVERHEAD
        count = -(-total // size)
        return sum(
            self._chunk(index == count - 1, count, size, total).size(stamp.text + len(str(index)))
            for index in range(count)
        )

    def _chunk(self, last: bool, count: int, size: int, total: int) -> _Template:
        """A chunk of a set; the last one holds the rest (and must carry the last index)."""
        key = (last, count, size, total)
        template = self._chunks.get(key)
        if template is None:
            index = count - 1 if last else 0
            reference = Chunk(
                device_id=_REF_DEVICE,
                msg_id="0" * 32,  # the carried message's id: always 32 hex digits
                index=index,
                count=count,
                chunk_size=size,
                total_bytes=total,
                sha256="0" * 64,
                data=np.zeros(total - index * size if last else size, np.uint8),
            )
            text = Stamp(_REF_DEVICE, 0, 0).text + len(str(index))
            template = _Template.of(encode(reference), text)
            self._chunks[key] = template
        return template
