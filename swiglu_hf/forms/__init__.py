"""MLP forms behind one interface (forms/base.py). A recipe names its form by `name`."""

from .base import Form
from .dense import PackedForm, SplitForm
from .experts import ExpertsForm, use_eager_experts
from .grouped import ExpertGLUForm, ParallelExpertsForm, StackedForm

FORMS: dict[str, Form] = {
    f.name: f for f in (SplitForm(), PackedForm(), ExpertsForm(), ExpertGLUForm(), ParallelExpertsForm(), StackedForm())
}

__all__ = ["FORMS", "Form", "use_eager_experts"]
