"""Lightning callbacks for ContinuousNet models, installed as ``lightning_cnet.callbacks``."""
