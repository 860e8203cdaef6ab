"""Everything that imports megatron.core lives in this package (STYLE.md, point 1)."""

import warnings

# Megatron-Core warns at import time when TransformerEngine / apex are absent (every CPU run):
# the fallbacks are exactly what we want there, so keep the console readable.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|apex).*")
