"""lmlab: build, train, evaluate and honestly compare small language models.

Importing lmlab registers ``model_type: lmlab`` with ``transformers``' auto classes (when
``transformers`` is installed; see ``lmlab.interop.autoregister``)."""

from lmlab.interop.autoregister import install as _install_transformers_registration

_install_transformers_registration()
