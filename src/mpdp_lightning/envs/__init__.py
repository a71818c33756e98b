"""The task registry: gymnasium environments, their spaces and termination functions."""
