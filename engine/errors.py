class ModelFileError(ValueError):
    """A model file that cannot be used: unreadable, corrupt, unsupported, or not a Flux checkpoint.

    The message always names the file and the problem.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
