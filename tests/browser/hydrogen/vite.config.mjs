export default {
  base: "./",
  logLevel: "warn",
  build: { target: "es2022", sourcemap: false, chunkSizeWarningLimit: 8192, emptyOutDir: true },
};
