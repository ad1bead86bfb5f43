"""How a model is spread over devices. Every process group comes from one DeviceMesh (mesh.py)."""
