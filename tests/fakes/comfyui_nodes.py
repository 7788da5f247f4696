"""The fake ComfyUI's node catalogue and prompt validation, shaped like ComfyUI 0.3.64's (protocol doc §2, §6.1).

Only the model-free nodes the capture used, plus `CustomOOM`, a stand-in for a custom node that runs out of
GPU memory (the capture had no GPU; the exception type and message are torch's).
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Any

INT_DIM = ("INT", {"default": 512, "min": 1, "max": 16384, "step": 1})
IMAGE = ("IMAGE", {})
ANY = ("*", {})
STRING = ("STRING", {"default": ""})
UPSCALE = (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {})

SCHEMAS: dict[str, dict[str, Any]] = {
    "EmptyImage": {"width": INT_DIM, "height": INT_DIM,
                   "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
                   "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"})},
    "ImageInvert": {"image": IMAGE},
    "ImageScale": {"image": IMAGE, "upscale_method": UPSCALE,
                   "width": ("INT", {"default": 512, "min": 0, "max": 16384, "step": 1}),
                   "height": ("INT", {"default": 512, "min": 0, "max": 16384, "step": 1}),
                   "crop": (["disabled", "center"], {})},
    "ImageBlur": {"image": IMAGE, "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
                  "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1})},
    "SaveImage": {"images": IMAGE, "filename_prefix": ("STRING", {"default": "ComfyUI"})},
    "PreviewImage": {"images": IMAGE},
    "PrimitiveString": {"value": STRING},
    "RegexReplace": {"string": STRING, "regex_pattern": STRING, "replace": STRING},
    "PreviewAny": {"source": ANY},
    "TestSleep": {"value": ANY, "seconds": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 9999.0})},
    "TestSyncError": {"value": ANY},
    "CustomOOM": {"value": ANY},
}
OUTPUT_NODES = {"SaveImage", "PreviewImage", "PreviewAny"}


class PromptRejected(Exception):
    """POST /prompt answers 400 with this body."""

    def __init__(self, body: dict):
        self.body = body


def _error(type_: str, message: str, details: str = "", **extra) -> dict:
    return {"type": type_, "message": message, "details": details, "extra_info": extra}


def _check_literal(name: str, spec: tuple, value: Any) -> dict | None:
    kind, options = spec
    if isinstance(kind, list):
        if value not in kind:
            return _error("value_not_in_list", "Value not in list", f"{name}: {value!r} not in {kind}",
                          input_name=name, input_config=[kind, options], received_value=value)
        return None
    if kind in ("INT", "FLOAT"):
        try:
            number = int(value) if kind == "INT" else float(value)
        except (TypeError, ValueError) as exc:
            return _error("invalid_input_type", f"Failed to convert an input value to a {kind} value",
                          f"{name}, {value}, {exc}", input_name=name, input_config=list(spec),
                          received_value=value, exception_message=str(exc))
        if "max" in options and number > options["max"]:
            return _error("value_bigger_than_max", f"Value {number} bigger than max of {options['max']}",
                          name, input_name=name, input_config=list(spec), received_value=value)
        if "min" in options and number < options["min"]:
            return _error("value_smaller_than_min", f"Value {number} smaller than min of {options['min']}",
                          name, input_name=name, input_config=list(spec), received_value=value)
    return None


def validate(prompt: Any, targets: list[str] | None = None) -> tuple[list[str], dict]:
    """(output node ids to run, node_errors) or PromptRejected; TypeError for a non-object (a 500)."""
    for node_id, node in prompt.items():  # AttributeError/TypeError on a list: ComfyUI's 500 too
        if "class_type" not in node:
            raise PromptRejected({"error": _error("invalid_prompt", "Cannot execute because a node is missing "
                                                  "the class_type property.", f"Node ID '#{node_id}'"),
                                  "node_errors": {}})
        if node["class_type"] not in SCHEMAS:
            raise PromptRejected({"error": _error("invalid_prompt", f"Cannot execute because node "
                                                  f"{node['class_type']} does not exist.", f"Node ID '#{node_id}'"),
                                  "node_errors": {}})
    outputs = sorted((n for n, node in prompt.items() if node["class_type"] in OUTPUT_NODES), key=_id_key)
    if targets:
        outputs = [o for o in outputs if o in targets]
    if not outputs:
        raise PromptRejected({"error": _error("prompt_no_outputs", "Prompt has no outputs"), "node_errors": {}})
    own_errors: dict[str, list] = {}
    valid: dict[str, bool] = {}

    def check(node_id: str) -> bool:
        if node_id in valid:
            return valid[node_id]
        valid[node_id] = True
        node, ok, errors = prompt[node_id], True, []
        for name, spec in SCHEMAS[node["class_type"]].items():
            value = node.get("inputs", {}).get(name)
            if value is None:
                errors.append(_error("required_input_missing", "Required input is missing", name, input_name=name))
            elif isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                source = prompt.get(value[0])
                if source is None:
                    errors.append(_error("exception_during_inner_validation", "Exception when validating inner node",
                                         f"'{value[0]}'", input_name=name, exception_message=f"'{value[0]}'",
                                         exception_type="KeyError", linked_node=[node_id, 0]))
                elif value[1] != 0 or source["class_type"] in OUTPUT_NODES - {"PreviewAny"}:
                    errors.append(_error("exception_during_inner_validation", "Exception when validating inner node",
                                         "tuple index out of range", input_name=name, exception_type="IndexError",
                                         exception_message="tuple index out of range", linked_node=[node_id, 0]))
                elif not check(value[0]):
                    ok = False
            elif spec[0] != "IMAGE":
                error = _check_literal(name, spec, value)
                if error:
                    errors.append(error)
        if errors:
            own_errors[node_id] = errors
        valid[node_id] = ok and not errors
        return valid[node_id]

    good = [o for o in outputs if check(o)]
    node_errors = {}
    for node_id, errors in own_errors.items():
        dependent = [o for o in outputs if node_id in ancestors(prompt, o)]
        node_errors[node_id] = {"errors": errors, "dependent_outputs": dependent,
                                "class_type": prompt[node_id]["class_type"]}
    if not good:
        raise PromptRejected({"error": _error("prompt_outputs_failed_validation", "Prompt outputs failed validation"),
                              "node_errors": node_errors})
    return good, node_errors


def _id_key(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def ancestors(prompt: dict, node_id: str) -> set[str]:
    seen, stack = set(), [node_id]
    while stack:
        current = stack.pop()
        if current in seen or current not in prompt:
            continue
        seen.add(current)
        stack.extend(v[0] for v in prompt[current].get("inputs", {}).values() if isinstance(v, list) and len(v) == 2)
    return seen


def execution_order(prompt: dict, outputs: list[str]) -> list[str]:
    """Topological, preferring a ready output node, then the lowest id: the captured order 1, 2, 5, 3, 4."""
    needed = set().union(*(ancestors(prompt, o) for o in outputs))
    deps = {n: {v[0] for v in prompt[n].get("inputs", {}).values() if isinstance(v, list) and len(v) == 2}
            for n in needed}
    order: list[str] = []
    while len(order) < len(needed):
        ready = [n for n in needed if n not in order and deps[n] <= set(order)]
        ready.sort(key=lambda n: (prompt[n]["class_type"] not in OUTPUT_NODES, _id_key(n)))
        order.append(ready[0])
    return order


def signature(prompt: dict, node_id: str) -> str:
    """Equal for a node whose class, literals and upstream are unchanged: ComfyUI's cache key (§2)."""
    node = prompt[node_id]
    parts = [node["class_type"]]
    for name, value in sorted(node.get("inputs", {}).items()):
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
            parts.append(f"{name}=<{signature(prompt, value[0])}>")
        else:
            parts.append(f"{name}={value!r}")
    return "(" + ",".join(parts) + ")"


def full_type_name(exc: BaseException) -> str:
    """ComfyUI's naming of exception types: module-qualified except builtins (§6.2)."""
    klass = type(exc)
    return klass.__qualname__ if klass.__module__ == "builtins" else f"{klass.__module__}.{klass.__qualname__}"


class Interrupted(Exception):
    pass


OutOfMemoryError = type("OutOfMemoryError", (RuntimeError,), {"__module__": "torch"})


def png(width: int, height: int, color: int) -> bytes:
    """A real, solid-colour RGB PNG (capped at 256 px a side: the fake stores every file in memory)."""
    width, height = max(1, min(width, 256)), max(1, min(height, 256))
    row = b"\x00" + bytes(((color >> 16) & 255, (color >> 8) & 255, color & 255)) * width

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b"")


async def run_node(class_type: str, inputs: dict, ctx) -> tuple[Any, dict | None]:
    """(output value, UI dict or None). `ctx` is the fake's execution context: files, progress, interrupt."""
    if class_type == "EmptyImage":
        await ctx.work(ctx.server.node_s)
        return ("IMG", inputs["width"], inputs["height"], inputs["color"]), None
    if class_type == "ImageInvert":
        await ctx.work(ctx.server.node_s)
        _, w, h, c = inputs["image"]
        return ("IMG", w, h, c ^ 0xFFFFFF), None
    if class_type == "ImageScale":
        await ctx.work(ctx.server.node_s)
        return ("IMG", inputs["width"], inputs["height"], inputs["image"][3]), None
    if class_type == "ImageBlur":
        await ctx.work(ctx.server.blur_s)  # not interruptible inside: no progress hook (§6.3)
        return inputs["image"], None
    if class_type == "SaveImage":
        return None, {"images": [ctx.save(inputs["images"], inputs["filename_prefix"], "output")]}
    if class_type == "PreviewImage":
        return None, {"images": [ctx.save(inputs["images"], "ComfyUI", "temp")]}
    if class_type == "PrimitiveString":
        return inputs["value"], None
    if class_type == "RegexReplace":
        return re.sub(inputs["regex_pattern"], inputs["replace"], inputs["string"]), None
    if class_type == "PreviewAny":
        return None, {"text": [str(inputs["source"])]}
    if class_type == "TestSleep":
        await ctx.sleep_with_progress(float(inputs["seconds"]))
        return inputs["value"], None
    if class_type == "TestSyncError":
        raise RuntimeError("Intentional sync execution error")
    if class_type == "CustomOOM":
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity "
                               "of 23.64 GiB of which 3.06 MiB is free.")
    raise AssertionError(class_type)
