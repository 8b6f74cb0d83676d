"""Published output schemas: the writers build their tables from these, tests read them too."""
