"""What DALI's errors say: whether a pipeline failed on the data (a file it could not read or
decode) rather than, say, on its own build; the line of the error that says why; and the files it
names. DALI 2.4 names the file itself for a truncated JPEG ("Failed to decode sample #0 : PATH")
and an empty file ("File mapping failed: PATH"), but not for data that is no image at all
("nvImageCodec failure: '#4'"). The sources turn these into a message naming the bad images
(:meth:`data_pipelines.sources.Source.dali_failure`)."""
from __future__ import annotations

import re

# How DALI 2.4 names a file: "Failed to decode sample #3 : PATH" (decoders), "File mapping
# failed: PATH" (reader, empty or unreadable file).
_NAMED_FILE = re.compile(r"(?:Failed to decode sample #\d+ : |File mapping failed: )(.+?)\s*$", re.M)


def is_data_error(err: RuntimeError) -> bool:
    """A failure of the reader or a decoder while running (not, say, a build error)."""
    text = str(err)
    return "fn.readers.file" in text or "fn.readers.webdataset" in text or "fn.decoders." in text


def dali_reason(message: str) -> str:
    """The line of DALI's error that says what went wrong (DALI prints a graph traceback first)."""
    tail = message.split("encountered:", 1)[-1].strip().splitlines()
    useful = [ln for ln in tail if ln.strip() and "no longer valid" not in ln and "C++ context" not in ln]
    return useful[0].strip() if useful else message.strip().splitlines()[0]


def named_files(message: str) -> list[str]:
    """The files DALI's error ``message`` names, in its order."""
    return [m.group(1) for m in _NAMED_FILE.finditer(message)]
