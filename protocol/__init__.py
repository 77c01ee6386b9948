"""sfprompt.protocol, imported only under that name (linked as sfprompt/protocol)."""

# A bare `import protocol` from the checkout would load a second copy of every module.
if __name__ != "sfprompt.protocol":
    raise ImportError(f"import this part as sfprompt.protocol, not as {__name__}")
