"""The command-line tools, `python -m resnet_fused {info,bench,profile,check,warmup}`: bench
(fused vs stock, side by side), profile (per-layer time), check (every Triton config against
float64), info (versions, device, backends) and warmup (the CLI of `resnet_fused.warmup()`), with
their shared timing (timing.py) and argument types (cli.py).

They are built on the library and never imported by it: nothing under resnet_fused/ outside this
package imports resnet_fused.tools, and `import resnet_fused` loads none of it.
"""
