"""sfprompt.export, imported only under that name (linked as sfprompt/export)."""

# A bare `import export` from the checkout would load a second copy of every module.
if __name__ != "sfprompt.export":
    raise ImportError(f"import this part as sfprompt.export, not as {__name__}")
