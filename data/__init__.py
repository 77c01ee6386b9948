"""sfprompt.data, imported only under that name (linked as sfprompt/data)."""

# A bare `import data` from the checkout would load a second copy of every module.
if __name__ != "sfprompt.data":
    raise ImportError(f"import this part as sfprompt.data, not as {__name__}")
