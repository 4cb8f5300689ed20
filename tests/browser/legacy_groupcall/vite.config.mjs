// Builds the legacy GroupCall test page against the repository's pinned matrix-js-sdk (43).
export default {
  base: "./",
  logLevel: "warn",
  build: { target: "es2022", sourcemap: false, chunkSizeWarningLimit: 8192, emptyOutDir: true },
};
