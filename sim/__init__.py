"""sfprompt.sim, imported only under that name (linked as sfprompt/sim)."""

# A bare `import sim` from the checkout would load a second copy of every module.
if __name__ != "sfprompt.sim":
    raise ImportError(f"import this part as sfprompt.sim, not as {__name__}")
