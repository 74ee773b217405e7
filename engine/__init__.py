"""engine: curates instruction-tuning data for vision-language models that stay robust to ambiguous,
misleading and corrupted inputs. Stages compute facts about samples into a store; recipes decide, in SQL,
which samples form a training mixture."""

__version__ = "0.1.0"
