"""Generation: turning a rank's step function into tokens.

`generate.py` is the loop every command shares today (prefill in groups of similar length, then one
token per row per step; sampling). The long-lived engine belongs here too: a scheduler that admits
requests into KV cache slots and runs one step for all of them, and its Python API. It sits above
`runner` (rank processes, the step across segments and collectives) and below the commands that use it
(`commands/`, `validate/`).
"""
