"""sfprompt.edge_client, imported only under that name (linked as sfprompt/edge_client)."""

# A bare `import edge_client` from the checkout would load a second copy of every module.
if __name__ != "sfprompt.edge_client":
    raise ImportError(f"import this part as sfprompt.edge_client, not as {__name__}")
