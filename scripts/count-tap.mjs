// Counts the test points of a TAP stream (stdin), subtests flattened, and prints
// "N passed, N failed" (skipped and todo points counted apart).
import { Parser } from 'tap-parser'

const parser = new Parser({ flat: true }, function report (results) {
  const skipped = (results.skip ?? 0) + (results.todo ?? 0)
  const failed = results.fail ?? 0
  const passed = (results.pass ?? 0) - skipped
  process.stdout.write(`${passed} passed, ${failed} failed${skipped > 0 ? `, ${skipped} skipped` : ''}\n`)
})
process.stdin.pipe(parser)
