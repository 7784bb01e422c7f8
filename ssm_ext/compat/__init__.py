"""Import-path twins of the libraries ssm_ext replaces: change `import X` to
`import ssm_ext.compat.X` (or `from ssm_ext.compat.X import ...`)."""
