"""sfprompt.cloud_server, imported only under that name (linked as sfprompt/cloud_server)."""

# A bare `import cloud_server` from the checkout would load a second copy of every module.
if __name__ != "sfprompt.cloud_server":
    raise ImportError(f"import this part as sfprompt.cloud_server, not as {__name__}")
