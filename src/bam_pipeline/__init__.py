"""bam-pipeline: Branch-Attend-Mix upcycling of a dense transformer into a Mixture of Experts."""

__version__ = "0.1.0"
