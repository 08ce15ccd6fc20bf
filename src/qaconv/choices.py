"""The values a configuration's options may take (backbones, matchers, augmentations, ...), as plain tuples.

No heavy imports here: the command line builds its parser (and answers ``--help``) from these and from
:mod:`qaconv.engine.config` without importing torch. The modules that implement each choice import their
names from here, so there is one list of each."""

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
FINAL_LAYERS = {"layer2": 8, "layer3": 16, "layer4": 32}  # backbone stage -> its output stride
INPUT_NORMS = ("imagenet", "none")
IBN_TYPES = ("a", "b")
MATCHERS = ("qaconv", "pooled")
VERSIONS = ("1", "2.1")  # QAConv heads
AUGMENTS = ("full", "flip-occlusion", "none")
RERANK_INPUTS = ("sigmoid", "logit")
