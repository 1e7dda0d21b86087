"""Learning side of VELO: simulator, LRS (MAPPO + Transformer + expert demonstrations), baselines,
evaluation, calibration and ONNX export. Needs torch (``pip install velo-proxy[train]``); the proxy
never imports this package. Entry point: ``python -m policy.reproduce``."""
