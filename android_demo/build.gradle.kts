// Versions live in gradle/libs.versions.toml (tests/test_android_demo.py checks the combination).
plugins {
    alias(libs.plugins.android.application) apply false
    alias(libs.plugins.kotlin.android) apply false
    alias(libs.plugins.kotlin.compose) apply false
}
