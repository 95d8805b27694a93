"""Paths named by input files (an image's file_name) joined to a root they must never leave."""

from __future__ import annotations

import os


def unsafe_name(file_name: object) -> str | None:
    """Why a file name from an input file may not be joined to its root, or None when it is safe: not a
    non-empty string, a NUL byte, a URL (any scheme, file: included), an absolute path, or '..'."""
    if not isinstance(file_name, str) or not file_name.strip():
        return f"file_name {file_name!r} is not a non-empty string"
    if "\x00" in file_name:
        return f"file_name {file_name!r} contains a NUL byte"
    if "://" in file_name or file_name.lower().startswith("file:"):
        return f"file_name {file_name!r} is a URL, not a path relative to the image root"
    norm = file_name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return f"file_name {file_name!r} is absolute"
    if ".." in norm.split("/"):
        return f"file_name {file_name!r} contains '..' and would escape the image root"
    return None


def outside_root(root: str, file_name: str) -> str | None:
    """The resolved path (symlinks followed) of root/file_name when it lies outside the resolved root, else None."""
    root_real = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, file_name))
    return real if os.path.commonpath([root_real, real]) != root_real else None


def safe_local_path(root: str, file_name: str) -> str:
    """root/file_name, resolved, for a name from an input file; ValueError naming it when it is unsafe or
    leaves the root through a symlink."""
    why = unsafe_name(file_name)
    if why:
        raise ValueError(why)
    real = outside_root(root, file_name)
    if real is not None:
        raise ValueError(
            f"file_name {file_name!r} resolves to {real}, outside the root {os.path.realpath(root)}"
        )
    return os.path.realpath(os.path.join(root, file_name))
