// Counts the leaf test points (assertions) of a TAP stream on stdin, or of every TAP file named
// as an argument (summed), at every depth, and prints "N passed, N failed" (with ", N skipped"
// for skip and todo points). A subtest's own summary point is not counted: its assertions are.
import { createReadStream } from 'node:fs'
import { Parser } from 'tap-parser'

const counts = { passed: 0, failed: 0, skipped: 0 }

/** Watches one (sub)test; returns how many failures were counted inside it. */
function watch (parser) {
  const children = new Map()
  const own = { failed: 0 }
  parser.on('child', function onChild (child) {
    children.set(child.name, watch(child))
  })
  parser.on('assert', function onAssert (point) {
    const child = children.get(point.name)
    if (child !== undefined) {
      // A subtest's result point: its assertions were counted already, unless it failed
      // without a failing assertion (a crash, a timeout), which then counts as one failure.
      if (!point.ok && !point.todo && !point.skip && child.failed === 0) { counts.failed++; own.failed++ } else own.failed += child.failed
      return
    }
    if (point.skip || point.todo) counts.skipped++
    else if (point.ok) counts.passed++
    else { counts.failed++; own.failed++ }
  })
  return own
}

/** Counts one TAP stream to its end. */
function count (stream) {
  return new Promise(function counted (resolve, reject) {
    const root = new Parser()
    watch(root)
    root.on('complete', resolve)
    stream.on('error', reject)
    stream.pipe(root)
  })
}

const files = process.argv.slice(2)
for (const stream of files.length === 0 ? [process.stdin] : files.map((file) => createReadStream(file))) {
  await count(stream)
}
const skipped = counts.skipped > 0 ? `, ${counts.skipped} skipped` : ''
process.stdout.write(`${counts.passed} passed, ${counts.failed} failed${skipped}\n`)
