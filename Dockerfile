# syntax=docker/dockerfile:1
# Build stage: dev dependencies, then the service bundled into one file (scripts/build.mjs).
FROM node:24.21.0-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY scripts/build.mjs ./scripts/build.mjs
COPY src ./src
RUN npm run build

# Development tools of docker-compose.yml only (Care360 sandbox, development IdP, demo page), run
# from the build stage's dev dependencies. Never deployed; the runtime stage below stays the last
# one, so a plain `docker build .` still produces the production image.
FROM build AS dev-tools
COPY demo ./demo
ENV NODE_ENV=development
USER node
EXPOSE 4000 4010 5173
CMD ["node", "--import", "tsx", "demo/compose-tools.ts"]

# Runtime stage: the bundle only (every dependency is inside it: no node_modules, no npm), as a
# non-root user. package.json is there for "type": "module".
FROM node:24.21.0-bookworm-slim AS runtime
ENV NODE_ENV=production
WORKDIR /app
COPY package.json ./
COPY --from=build /app/dist ./dist
USER node
EXPOSE 3000 9464
# No curl in the image: Node itself probes readiness.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.PORT||3000)+'/healthz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
# Node runs as PID 1 directly, so SIGTERM reaches it (npm would swallow it) and graceful shutdown runs.
CMD ["node", "--max-semi-space-size=4", "dist/server.js"]
