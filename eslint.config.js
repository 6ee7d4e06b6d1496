import neostandard from 'neostandard'

export default [
  ...neostandard({ ts: true, ignores: ['dist/**', 'coverage/**', '.tap/**', 'node_modules/**', 'test-artifacts/**'] }),
  {
    rules: {
      // A TypeBox schema and its Static type share one name on purpose; TypeScript itself
      // reports real redeclarations.
      '@typescript-eslint/no-redeclare': 'off'
    }
  }
]
