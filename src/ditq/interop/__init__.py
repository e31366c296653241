"""Interoperability with the other tools that run Ideogram 4 (stable-diffusion.cpp, ComfyUI, ComfyUI-GGUF, diffusers).

- `keys`: official fused <-> diffusers split names, prefixes.
- `layouts`: recognize a checkpoint's layout from its header; refuse what no loader reads.
- `imports`: other tools' files -> ditq pipeline folders (`build_pipeline`).
- `export`: ditq pipeline folders -> stable-diffusion.cpp / ComfyUI single files (`export`).
- `checkers`: the loaders' rules applied to a GGUF or ComfyUI INT8 file (`check_gguf`, `check_int8`).
- `convrot`: ComfyUI's ConvRot block-Hadamard rotation and the INT8 layer that runs it.

See docs/LAYOUTS.md.
"""
